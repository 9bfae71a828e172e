"""``python -m unclip_jax.convert {karlo,clip,prior,unet} ...``: one entry for every importer."""

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m unclip_jax.convert karlo --src=DIR --out=DIR\n"
             "       python -m unclip_jax.convert {clip,prior,unet} ... (see --help of each)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    command, rest = argv[0], argv[1:]
    if command == "karlo":
        import argparse
        parser = argparse.ArgumentParser(prog="python -m unclip_jax.convert karlo",
                                         description="Convert a diffusers Karlo UnCLIPPipeline directory")
        parser.add_argument("--src", required=True, help="diffusers UnCLIPPipeline directory (Karlo download)")
        parser.add_argument("--out", required=True, help="output pipeline directory for sample.py --checkpoint")
        args = parser.parse_args(rest)
        from unclip_jax.convert.common import ConversionError
        from unclip_jax.convert.karlo import convert_karlo
        try:
            convert_karlo(args.src, args.out, log=lambda m: print(m, file=sys.stderr))
        except ConversionError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {args.out}", file=sys.stderr)
    elif command == "clip":
        from unclip_jax.convert.clip import main as run
        run(rest)
    elif command == "prior":
        from unclip_jax.convert.prior import main as run
        run(rest)
    elif command == "unet":
        from unclip_jax.convert.unet import main as run
        run(rest)
    else:
        sys.exit(f"unknown command {command!r}\n{usage}")


if __name__ == "__main__":
    main()
