"""`dlma push`: publish an aligned model and its pairs on the Hugging Face Hub."""

from __future__ import annotations

from .common import formatter, print_summary

HELP = """\
Upload a trained model to the Hugging Face Hub: RUN_DIR is a `dlma run` directory (its
final-model) or a `dlma train` --out directory. The model repository REPO gets the weights
(or the LoRA adapter) and tokenizer with a model card (base model, method and loss settings,
pair statistics, the evaluation table of a `dlma run`, the command); the pairs the model was
trained on go to the dataset repository REPO-pairs (--dataset-repo) in TRL's conversational
preference format, with a card of their own. dlma's bookkeeping (summaries, metrics, cached
reference log-probs, checkpoints, tracker logs) stays local.

Log in first (`hf auth login`) or set HF_TOKEN.

examples:
  dlma push runs/default me/smollm2-135m-dlma
  dlma push ckpt me/my-adapter --no-pairs --private
"""


def register(sub) -> None:
    p = sub.add_parser("push", help="upload a trained model and its pairs to the Hugging Face Hub", description=HELP,
                       formatter_class=formatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="`dlma run` directory or `dlma train` --out directory")
    p.add_argument("repo", metavar="REPO", help="model repository id, e.g. me/smollm2-135m-dlma")
    p.add_argument("--dataset-repo", help="dataset repository for the pairs (default: REPO-pairs)")
    p.add_argument("--no-pairs", action="store_true", help="upload the model only")
    p.add_argument("--private", action="store_true", help="create the repositories private")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..push import push

    print_summary(push(args.run_dir, args.repo, dataset_repo=args.dataset_repo, pairs=not args.no_pairs,
                       private=args.private))
    return 0
