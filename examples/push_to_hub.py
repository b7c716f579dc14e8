"""Push a finished OLTR run to the Hugging Face Hub.

OLTR, Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160

Run folder convention (each part configurable):

    RUN_DIR/
      model/            the checkpoint written by save_pretrained (--model-dir; RUN_DIR itself if it holds
                        config.json and RUN_DIR/model does not)
      metrics.json      evaluation results shown in the model card (--metrics; skipped if missing, --no-metrics)

The checkpoint is loaded (strictly, from safetensors) and saved again into a temporary folder, so exactly
model.safetensors, config.json and README.md are uploaded, whatever else the run folder holds.

    python examples/push_to_hub.py runs/fmnist-oltr user/resnet18-oltr-fmnist --private

The token comes from --token, HF_TOKEN or `hf auth login`. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from huggingface_hub import errors as hf_errors

from timm_oltr.hub import CONFIG_NAME, from_pretrained, push_to_hub

_logger = logging.getLogger('push_to_hub')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', type=Path, help='finished run folder (see the convention above)')
    parser.add_argument('repo_id', help='Hub repo, user/name or org/name; created if missing')
    parser.add_argument('--private', action='store_true', help='create the repo private')
    parser.add_argument('--token', default=None, help='Hub token with write access (default: HF_TOKEN or login)')
    parser.add_argument('--model-dir', default='model', help='checkpoint folder inside RUN_DIR (default: model)')
    parser.add_argument('--metrics', default='metrics.json', help='metrics file inside RUN_DIR (default: metrics.json)')
    parser.add_argument('--no-metrics', action='store_true', help='push without a metrics table')
    parser.add_argument('--revision', default=None, help='branch to push to (default: main)')
    parser.add_argument('--commit-message', default=None, help='commit message')
    return parser.parse_args(argv)


def find_checkpoint(run_dir: Path, model_dir: str) -> Path:
    """The folder holding config.json: RUN_DIR/<model_dir>, else RUN_DIR itself."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f'RUN_DIR {run_dir} is not a folder.')
    for folder in (run_dir / model_dir, run_dir):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(
        f'No checkpoint in {run_dir}: neither {run_dir / model_dir} nor {run_dir} has {CONFIG_NAME} '
        '(pass --model-dir to point at the folder save_pretrained wrote).'
    )


def read_metrics(run_dir: Path, checkpoint: Path, name: str) -> dict | None:
    """metrics.json from RUN_DIR (or the checkpoint folder); None if there is none."""
    for path in (run_dir / name, checkpoint / name):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f'{path} is not valid JSON: {e}.') from e
    _logger.info('No %s in %s; the model card has no metrics table.', name, run_dir)
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.run_dir, args.model_dir)
        report = None if args.no_metrics else read_metrics(args.run_dir, checkpoint, args.metrics)
        model = from_pretrained(checkpoint)
        url = push_to_hub(
            model,
            args.repo_id,
            private=True if args.private else None,
            token=args.token,
            commit_message=args.commit_message,
            revision=args.revision,
            report=report,
        )
    except (OSError, ValueError, TypeError, hf_errors.HfHubHTTPError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == '__main__':
    sys.exit(main())
