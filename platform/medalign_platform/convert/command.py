"""``medalign convert``: the command-line front of the converters."""

from __future__ import annotations

import argparse

KINDS = ("llava-med", "unimed-clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="what the source is")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="llava-med: SRC OUT [VISION_TOWER]; unimed-clip: SRC.pt OUT")
    parser.add_argument("--text-encoder", default=None,
                        help="unimed-clip: folder of the BiomedBERT text encoder (config + tokenizer); keeps the text "
                             "tower, which prompt-aware attention needs")
    parser.add_argument("--context-length", type=int, default=256, help="unimed-clip: text context (default 256)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="llava-med: largest output shard in GiB (peak memory is about one shard)")


def convert_command(args) -> int:
    paths = args.paths
    if args.kind == "llava-med":
        if len(paths) not in (2, 3):
            raise SystemExit("usage: medalign convert llava-med SRC OUT [VISION_TOWER]")
        from .llava_med import convert_llava_med

        out = convert_llava_med(paths[0], paths[1], paths[2] if len(paths) == 3 else None,
                                max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"converted to {out}: use it with model.path={out} (e.g. experiment=llava_med_unimed_7b "
              f"model.path={out}); check with medalign check")
        return 0
    if len(paths) != 2:
        raise SystemExit("usage: medalign convert unimed-clip SRC.pt OUT [--text-encoder DIR]")
    from .unimed_clip import convert_unimed_clip

    out = convert_unimed_clip(paths[0], paths[1], text_encoder=args.text_encoder, context_length=args.context_length)
    print(f"converted to {out}: use it with teacher.name=local-dir:{out}"
          f"{'' if args.text_encoder else ' (vision tower only: teacher.attention=cls)'}")
    return 0
