"""``vmonarch-opt calibrate | show | plot | diff``: calibration profiles from the command line."""
from __future__ import annotations

import argparse
import sys

from ..cli import FACTORY_EXAMPLE, fail, input_file, json_arg, load_factory, output_file


def _load(path: str, **kw):
    from .profile import load_profile

    return load_profile(input_file(path, "profile JSON file"), **kw)  # a ProfileError is one line in main()


def grid_arg(text: str) -> tuple:
    """``--grid T,H,W`` as three positive integers (an argparse ``type``)."""
    try:
        g = tuple(int(x) for x in text.split(","))
    except ValueError:
        g = ()
    if len(g) != 3 or min(g) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give T,H,W, three positive integers whose product is the "
                                         f"number of video tokens, e.g. --grid 21,30,52")
    return g


def count_arg(text: str) -> int:
    """A number of tokens ≥ 0 (an argparse ``type``)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of tokens ≥ 0")
    return n


def methods_help() -> str:
    """``--methods`` help: the default methods and the opt-in ones, from the registry."""
    from .. import methods as registry

    extra = [n for n in registry.names() if n not in registry.default_methods()]
    return (f"comma-separated allowed methods (default: {', '.join(registry.default_methods())}"
            + (f"; opt-in: {', '.join(extra)})" if extra else ")"))


def methods_arg(text: str) -> tuple:
    """``--methods a,b`` as registered method names (an argparse ``type``)."""
    from .. import methods as registry

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    try:
        return registry.check_methods(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_calibrate(args) -> int:
    from ..planner import check_overrides
    from .budget import Budget
    from .calibrate import calibrate

    # every option checked before the factory builds the model
    output_file(args.output, "profile")
    budget = Budget(max_rel_error=args.max_rel_error, mean_rel_error=args.mean_rel_error,
                    output_rel_error=args.output_rel_error, cost=args.cost,
                    per_site=json_arg(args.per_site, "--per-site") if args.per_site else None)
    overrides = json_arg(args.overrides, "--overrides") if args.overrides else None
    check_overrides(overrides)
    made = load_factory(args.model)(**json_arg(args.kwargs, "--kwargs"))
    if not (isinstance(made, tuple) and len(made) == 2):
        fail(f"{args.model} must return (model, batch), got {type(made).__name__}")
    model, batch = made
    profile = calibrate(model, batch, budget=budget, methods=args.methods, overrides=overrides, grid=args.grid,
                        min_seq_len=args.min_seq_len, progress=False if args.quiet else None)
    profile.save(args.output)
    print(profile)
    print(f"\nprofile written to {args.output}")
    return 0


def _cmd_show(args) -> int:
    p = _load(args.profile)
    print(p.to_markdown() if args.markdown else str(p))
    if args.candidates:
        print()
        print(p.candidates_table(args.site))
    return 0


def _cmd_plot(args) -> int:
    from .plot import check_image_path

    check_image_path(output_file(args.output, "image"))
    p = _load(args.profile)
    out = p.plot(args.output)
    print(f"plot written to {out}")
    return 0


def _cmd_diff(args) -> int:
    a, b = _load(args.a), _load(args.b)
    print(f"A = {args.a}\nB = {args.b}")
    print(a.diff(b))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a model given as module:factory and write a profile")
    p.add_argument("model", help=f"module:factory returning (model, batch), imported from the current directory "
                                 f"or PYTHONPATH; e.g. {FACTORY_EXAMPLE} from a checkout of the repository")
    p.add_argument("-o", "--output", default="profile.json", help="profile JSON to write (default profile.json)")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory, e.g. '{\"frames\": 5}'")
    p.add_argument("--max-rel-error", type=float, default=0.05, help="per-site attention error budget (default 0.05)")
    p.add_argument("--mean-rel-error", type=float, default=None, help="global FLOP-weighted mean error budget")
    p.add_argument("--output-rel-error", type=float, default=None,
                   help="budget on the model's output error (each candidate also run in the model; pair it "
                        "with a loose --max-rel-error such as 0.5)")
    p.add_argument("--per-site", default=None, help="JSON {site_glob: max_rel_error}")
    p.add_argument("--cost", choices=("flops", "time"), default="flops", help="what 'cheapest' means")
    p.add_argument("--methods", type=methods_arg, default=None, help=methods_help())
    p.add_argument("--overrides", default=None, help="JSON {site_glob: method name or \"original\"}")
    p.add_argument("--grid", type=grid_arg, default=None, help="T,H,W latent token grid override")
    p.add_argument("--min-seq-len", type=count_arg, default=1024, help="shorter sites stay dense (default 1024)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("show", help="print a calibration profile")
    p.add_argument("profile")
    p.add_argument("--candidates", action="store_true", help="also list every measured candidate")
    p.add_argument("--site", default=None, help="with --candidates: only this site")
    p.add_argument("--markdown", action="store_true", help="print as a Markdown table")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("plot", help="plot a profile: per-layer entropy, block concentration, error, FLOP cut")
    p.add_argument("profile")
    p.add_argument("-o", "--output", default="profile.png", help="image to write (png/pdf/svg)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("diff", help="compare two profiles: fingerprint and per-site choices")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_diff)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main())
