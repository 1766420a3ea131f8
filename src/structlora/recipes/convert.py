"""``structlora convert SRC DST``: an adapter folder of structlora's own layout → PEFT's.

    structlora convert runs/sst2/adapter peft-adapter/      # then peft.PeftModel.from_pretrained(base, "peft-adapter")

SRC is a folder written by ``structlora.PeftModel.save_pretrained`` (this or an earlier release; a run's
``adapter/``); every adapter in it is converted ("default" at the top, the others in their sub-folders). DST loads
with ``peft.PeftModel.from_pretrained`` once structlora is imported, and computes what SRC does. What cannot be
converted exactly is refused, and nothing is written then.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the structlora adapter folder (left as it is)")
    parser.add_argument("dst", metavar="DST", help="the new PEFT adapter folder (refused when it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST when it exists")


def run(args: argparse.Namespace) -> int:
    from structlora.convert import convert_folder

    converted = convert_folder(args.src, args.dst, overwrite=args.overwrite)
    names = ", ".join(name or "default" for name in converted)
    print(f"converted {names} -> {args.dst} (peft.PeftModel.from_pretrained(base, {args.dst!r}) after "
          f"`import structlora`)", file=sys.stderr)
    return 0
