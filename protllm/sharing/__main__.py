"""The sharing CLI: `python -m protllm.sharing card|push|push-adapter|merge` (successor of `python sharing.py`).

    python -m protllm.sharing card FOLDER [--metrics metrics.json] [--training-args args.json] [--repo-id ORG/NAME]
    python -m protllm.sharing push FOLDER --repo-id ORG/NAME [--private] [--token T] [--metrics ...] [--training-args ...]
    python -m protllm.sharing push-adapter ADAPTER --repo-id ORG/NAME-lora [--base-repo-id ORG/NAME] [--private]
    python -m protllm.sharing merge BASE_FOLDER ADAPTER OUT_FOLDER

Exit status: 0 done, 2 a folder or input that is wrong (the message names what), 1 the Hub refused or could not be
reached.
"""

from __future__ import annotations

import argparse
import sys

from .card import write_model_card
from .hub import ModelFolderError, add_protein_function_pipeline, merge_adapter, push_adapter, push_model_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protllm.sharing", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    card_args = argparse.ArgumentParser(add_help=False)
    card_args.add_argument("--metrics", help="eval metrics.json (default FOLDER/metrics.json)")
    card_args.add_argument("--training-args", help="training-args JSON (default FOLDER/training_args.json)")
    card_args.add_argument("--base-model", action="append", help="base model Hub id or path (repeatable: LLM, encoder)")
    card_args.add_argument("--dataset", action="append", help="training dataset Hub id (repeatable)")
    card_args.add_argument("--license", help="override the inherited licence")
    card_args.add_argument("--eval-dataset", help="Hub id of the evaluation dataset for model-index")
    card_args.add_argument("--model-predictor", help="which predictor of metrics.json is this model")

    card = sub.add_parser("card", parents=[card_args], help="write FOLDER/README.md and add the pipeline")
    card.add_argument("folder")
    card.add_argument("--repo-id", help="repository id used in the usage snippet")
    push = sub.add_parser("push", parents=[card_args], help="check and upload a model folder")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token")
    push.add_argument("--commit-message", default="Upload ProtLLM model")
    push.add_argument("--create-pr", action="store_true")
    adapter = sub.add_parser("push-adapter", help="check and upload a PEFT adapter folder")
    adapter.add_argument("folder")
    adapter.add_argument("--repo-id", required=True)
    adapter.add_argument("--base-repo-id", help="Hub id of the base ProtLLM (replaces a local base path)")
    adapter.add_argument("--private", action="store_true")
    adapter.add_argument("--token")
    adapter.add_argument("--no-projector-ok", action="store_true", help="accept an adapter without projector weights")
    merge = sub.add_parser("merge", parents=[card_args], help="merge a PEFT adapter into its base model folder")
    merge.add_argument("base")
    merge.add_argument("adapter")
    merge.add_argument("out")
    return parser


def _card_kwargs(args) -> dict:
    kwargs = {"metrics": args.metrics, "training_args": args.training_args, "base_models": args.base_model,
              "datasets": args.dataset, "license": args.license, "eval_dataset": args.eval_dataset,
              "model_predictor": args.model_predictor}
    return {k: v for k, v in kwargs.items() if v is not None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "card":
            add_protein_function_pipeline(args.folder)
            path = write_model_card(args.folder, repo_id=args.repo_id, **_card_kwargs(args))
            print(f"wrote {path}")
        elif args.command == "push":
            info = push_model_folder(args.folder, args.repo_id, private=args.private, token=args.token,
                                     commit_message=args.commit_message, create_pr=args.create_pr, **_card_kwargs(args))
            print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
        elif args.command == "push-adapter":
            info = push_adapter(args.folder, args.repo_id, base_repo_id=args.base_repo_id, private=args.private,
                                token=args.token, require_projector=not args.no_projector_ok)
            print(f"pushed adapter {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
        elif args.command == "merge":
            out = merge_adapter(args.base, args.adapter, args.out, **_card_kwargs(args))
            print(f"wrote merged model {out}")
    except (ModelFolderError, FileNotFoundError, ValueError) as error:  # ForeignCodeError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the Hub: offline, unreachable, unauthorised (huggingface_hub errors are OSErrors)
        print(f"error: the Hub refused or could not be reached: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
