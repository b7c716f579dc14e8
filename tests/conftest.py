"""Shared fixtures: the real Fashion-MNIST files, skipped only where truly absent."""

import os

import pytest

from timm_oltr import data as oltr_data


@pytest.fixture(scope='session')
def fashion_mnist_files() -> None:
    """Skip when the Fashion-MNIST IDX files are missing; fail instead under TIMM_OLTR_REQUIRE_DATA=1 (CI)."""
    try:
        oltr_data._find_fashion_mnist(None)
    except FileNotFoundError as e:
        if os.environ.get('TIMM_OLTR_REQUIRE_DATA') == '1':
            pytest.fail(f'TIMM_OLTR_REQUIRE_DATA=1 but Fashion-MNIST is missing: {e}')
        pytest.skip(f'Fashion-MNIST not installed: {e}')
