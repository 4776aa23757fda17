"""``tokensieve train daam`` (a grid of runs), ``daam-frames`` (token selection for audio by the trained weights),
``daam-select`` (a frame selector trained for dropping, against the baselines, paired by seed) and ``daam-figures``
(importance maps); ``daam-corpus`` builds the speech corpus alone. See docs/DAAM.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .spkv import writable_folder


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus-seed", type=int, default=0, help="seed of the speech corpus (speakers, sentences, noise)")
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng/sox processes while generating")
    p.add_argument("--no-progress", action="store_true")


def _corpus_cfg(args: argparse.Namespace) -> Any:
    from ..data.speech import CorpusConfig

    if args.workers < 1:
        raise ConfigError("--workers must be ≥ 1")
    return CorpusConfig(seed=args.corpus_seed, workers=args.workers)


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise ConfigError("--threads must be ≥ 1")
    torch.set_num_threads(n)


def cmd_corpus(args: argparse.Namespace) -> int:
    from ..data.speech import corpus_dir, load_or_build

    cfg = _corpus_cfg(args)
    for task in args.tasks.split(","):
        c = load_or_build(task.strip(), cfg, progress=not args.no_progress)
        sizes = {s: int((c.split == i).sum()) for i, s in enumerate(("train", "val", "test"))}
        print(f"task {task}: {len(c.y)} rows of {c.x.shape[1]}×{c.x.shape[2]}, {sizes}, {len(c.classes)} classes")
        print(corpus_dir(cfg, task.strip()))
    return 0


def _open_store(args: argparse.Namespace) -> Any:
    """``--store FILE``: the results store the runs are recorded in, opened now (a bad path fails before any work)."""
    from ..results.store import ResultStore

    return ResultStore(args.store) if getattr(args, "store", None) else None


def _command(args: argparse.Namespace, name: str, options: tuple[str, ...]) -> str:
    """The command line of a DAAM subcommand, as recorded in the store."""
    import shlex

    parts = ["tokensieve", "train", name]
    for opt in options:
        value = getattr(args, opt.replace("-", "_"), None)
        if value is True:
            parts.append(f"--{opt}")
        elif value not in (None, False):
            parts += [f"--{opt}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _record_runs(store: Any, records: list[dict[str, Any]], command: str) -> None:
    from .. import __version__
    from ..results.daam import record_runs

    with store:
        added = record_runs(store, records, command=command, version=__version__)
    print(f"{added} DAAM runs recorded in {store.path} ({len(records) - added} were there)")


def cmd_train(args: argparse.Namespace) -> int:
    from .daam import grid, parse_seeds, run_grid, summary_table

    _threads(args.threads)
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    if not networks or not attentions:
        raise ConfigError("--networks and --attention each need at least one name")
    if args.pool and "transformer" not in networks:
        raise ConfigError("--pool chooses the transformer's pooling: it needs --networks transformer")
    runs = grid(
        args.task,
        networks,
        attentions,
        parse_seeds(args.seeds),
        args.epochs,
        args.time_axis,
        args.segments,
        args.feedforward,
        args.time_heads,
        args.modules,
        args.pool,
    )
    for r in runs:
        r.check()  # every run of the grid, before the corpus is built or anything trains
    writable_folder(Path(args.out), "--out")
    store = _open_store(args)
    records = run_grid(runs, Path(args.out), _corpus_cfg(args), progress=not args.no_progress)
    print(summary_table(records))
    if store is not None:
        options = ("task", "networks", "attention", "time-axis", "time-heads", "seeds", "epochs", "feedforward",
                   "segments", "modules", "pool", "out", "threads", "corpus-seed")  # fmt: skip
        _record_runs(store, records, _command(args, "daam", options))
    return 0


def cmd_frames(args: argparse.Namespace) -> int:
    from .daam import frame_selection, frames_table

    _threads(args.threads)
    try:
        fractions = [float(f) for f in args.keep.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--keep takes fractions in (0, 1], got {args.keep!r}") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"--keep takes fractions in (0, 1], got {args.keep!r}")
    rows = frame_selection(Path(args.out), fractions, _corpus_cfg(args), task=args.task, progress=not args.no_progress)
    print(frames_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _fractions(spec: str) -> list[float]:
    try:
        fractions = [float(f) for f in spec.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--keep takes fractions in (0, 1), got {spec!r}") from None
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ConfigError(f"--keep takes fractions in (0, 1), got {spec!r}")
    return fractions


def cmd_select(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from .daam import parse_seeds
    from .daam_select import report, run_selection, selector_pairs, write_json

    _threads(args.threads)
    fractions = _fractions(args.keep)
    seeds = parse_seeds(args.seeds)
    pairs = selector_pairs(args.task, seeds, args.epochs, feedforward=args.feedforward, time_heads=args.time_heads,
                           modules=args.modules)  # fmt: skip
    for pair in pairs:  # every run, before the corpus is built or anything trains
        for r in pair:
            r.check()
    if args.repeats < 1:
        raise ConfigError("--repeats must be ≥ 1")
    out = Path(args.out)
    writable_folder(out, "--out")
    rows = run_selection(out, args.task, seeds, args.epochs, fractions, feedforward=args.feedforward,
                         time_heads=args.time_heads, modules=args.modules, corpus_cfg=_corpus_cfg(args),
                         repeats=args.repeats, progress=not args.no_progress)  # fmt: skip
    print(report(rows, fractions))
    options = ("task", "seeds", "epochs", "feedforward", "time-heads", "modules", "keep", "repeats", "out", "threads",
               "corpus-seed")  # fmt: skip
    meta = {"command": _command(args, "daam-select", options), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}  # fmt: skip
    path = Path(args.json) if args.json else out / f"select_{args.task}.json"
    write_json(path, rows, fractions, meta)
    print(f"\nrows and paired comparisons: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .daam import done_runs, frames_table, paired_fronts_table, summary_table, versions_table

    out = Path(args.out)
    store = _open_store(args)
    records = list(done_runs(out).values())
    if not records:
        if store is not None:
            store.close()
        raise ConfigError(f"no finished runs in {out / 'results.jsonl'}: train some with `tokensieve train daam`")
    print(summary_table(records))
    print("\nfront blocks paired by seed:\n")
    print(paired_fronts_table(records))
    if args.compare:
        old = list(done_runs(Path(args.compare)).values())
        if not old:
            raise ConfigError(f"no finished runs in {Path(args.compare) / 'results.jsonl'} to compare with")
        print(f"\nearlier modules ({args.compare}) and corrected ({args.out}), paired by seed:\n")
        print(versions_table(old, records))
    if store is not None:
        _record_runs(store, records, _command(args, "daam-report", ("out",)))
    for path in sorted(out.glob("frames_*.json")):
        print(f"\n{path.name}:\n")
        print(frames_table(json.loads(path.read_text())))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .daam import figures

    _threads(args.threads)
    writable_folder(Path(args.figdir), "--figdir")
    store = _open_store(args)
    maps: list[dict[str, Any]] = []
    paths = figures(Path(args.out), Path(args.figdir), _corpus_cfg(args), maps=maps)
    for p in paths:
        print(p)
    if store is not None:
        from .. import __version__
        from ..results.daam import record_maps

        with store:
            record_maps(store, maps, paths, command=_command(args, "daam-figures", ("out", "figdir", "corpus-seed")),
                        version=__version__)  # fmt: skip
        print(f"importance maps of task(s) {', '.join(m['task'] for m in maps)} recorded in {store.path}")
    return 0


def _modules_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--modules",
        default="official",
        choices=["official", "v1"],
        help="official: the DAAM modules and networks as the authors' code computes them; v1: the earlier modules",
    )


def add_commands(tsub: Any) -> None:
    c = tsub.add_parser("daam-corpus", help="generate (or find cached) the offline speech corpus (espeak-ng + sox)")
    c.add_argument("--tasks", default="a,b", help="a (paralinguistic, binary), b (spoken words) or both")
    _corpus_args(c)
    c.set_defaults(func=cmd_corpus)

    t = tsub.add_parser("daam", help="train the DAAM speech networks on the offline speech corpus (a grid of runs)")
    t.add_argument("--task", default="a", choices=["a", "b"])
    t.add_argument("--networks", default="cnnlstm", help="comma-separated: cnnlstm, transformer")
    t.add_argument("--attention", default="daam,mha,none", help="front blocks, comma-separated: daam, mha, none")
    t.add_argument("--time-axis", action="store_true", help="DAAM runs get a second Gaussian layer on the time axis")
    t.add_argument(
        "--time-heads",
        type=int,
        default=0,
        help="heads of the time-axis layer (default: as the mel layer, 4; 1 normalises over all frames)",
    )
    t.add_argument("--seeds", default="0-4", help="seeds: 0-4 or 0,1,2")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--feedforward", type=int, default=2048, help="the transformer's feed-forward width")
    t.add_argument("--segments", type=int, default=0, help="task A: at most N training segments per recording (0: all)")
    _modules_arg(t)
    t.add_argument("--pool", default="", choices=["", "last", "mean"],
                   help="the transformer's pooling (default: last with --modules official, mean with v1)")  # fmt: skip
    t.add_argument("--out", default="runs/daam", help="results.jsonl and checkpoints/ (finished runs are skipped)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument(
        "--store",
        default=None,
        metavar="FILE",
        help="also record the runs in this results store (`tokensieve report` shows them)",
    )
    _corpus_args(t)
    t.set_defaults(func=cmd_train)

    f = tsub.add_parser("daam-frames", help="keep 50 / 25 %% of frames before the transformer encoder: F1 and time")
    f.add_argument("--out", default="runs/daam")
    f.add_argument("--task", default="b", choices=["a", "b"])
    f.add_argument("--keep", default="0.5,0.25", help="fractions of frames kept")
    f.add_argument("--json", default=None, help="also write the rows to this JSON file")
    f.add_argument("--threads", type=int, default=1)
    _corpus_args(f)
    f.set_defaults(func=cmd_frames)

    s = tsub.add_parser(
        "daam-select",
        help="train a frame selector for dropping and compare it with every / evenly spaced / random / DAAM-importance"
        " / loudest frames, paired by seed, with the encoder time",
    )
    s.add_argument("--task", default="b", choices=["a", "b"])
    s.add_argument("--seeds", default="0-4", help="seeds: 0-4 or 0,1,2 (one plain and one selector run each)")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--feedforward", type=int, default=512, help="the transformer's feed-forward width")
    s.add_argument("--time-heads", type=int, default=0, help="heads of the time-axis Gaussian layer (0: 4)")
    _modules_arg(s)
    s.add_argument("--keep", default="0.25,0.5", help="fractions of frames kept, in (0, 1)")
    s.add_argument("--repeats", type=int, default=5, help="timed forward passes per configuration (median)")
    s.add_argument("--out", default="runs/daam-official",
                   help="results.jsonl and checkpoints/ (the grid's folder: its plain runs are reused)")  # fmt: skip
    s.add_argument("--json", default=None, help="rows and paired comparisons (default: OUT/select_<task>.json)")
    s.add_argument("--threads", type=int, default=1)
    _corpus_args(s)
    s.set_defaults(func=cmd_select)

    r = tsub.add_parser("daam-report", help="the comparison table (mean ± std over seeds) of every run in --out")
    r.add_argument("--out", default="runs/daam")
    r.add_argument(
        "--compare",
        default=None,
        metavar="DIR",
        help="a grid folder of runs with the earlier modules: its rows next to --out's, paired by seed",
    )
    r.add_argument(
        "--store",
        default=None,
        metavar="FILE",
        help="also record every finished run of --out in this results store (nothing is trained)",
    )
    r.set_defaults(func=cmd_report)

    g = tsub.add_parser("daam-figures", help="importance maps (mel bands and frames) of trained DAAM runs, as PNG")
    g.add_argument("--out", default="runs/daam")
    g.add_argument("--figdir", default="docs/figures")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument(
        "--store",
        default=None,
        metavar="FILE",
        help="also record the importance maps and figures in this results store (`tokensieve report`)",
    )
    _corpus_args(g)
    g.set_defaults(func=cmd_figures)
