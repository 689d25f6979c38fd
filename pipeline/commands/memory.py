"""`vmem` subcommands of the memory layer (classify, explain, add, delete, compact, prune, intervene, stats)
and of evaluation (eval)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from pipeline.commands.inputs import item_id, label, load_vectors, positive_int
from pipeline.commands.registry import command
from pipeline.config import Config
from pipeline.errors import UserError

log = logging.getLogger("vmem")


def _open(cfg: Config):
    from pipeline import storage
    from pipeline.memory.memory import VisualMemory

    storage.configure(cfg.storage)
    return VisualMemory.open(cfg.memory_dir, cfg=cfg)


def _maintain(cfg: Config, mem) -> None:
    """Auto-compaction after a committed edit (when due and `memory.auto_compact`); the memory's edits never
    compact themselves (that is maintenance: this helper in the CLI, a background task in `vmem serve`).

    The edit is durable and its result printed before this runs, so a failure here is a warning line on
    stderr, never a traceback or a non-zero exit: a client that trusts the exit code must not retry an edit
    that was made. Compaction can be run again at any time (`vmem compact`)."""
    sys.stdout.flush()
    try:
        mem.maintain()  # table upkeep, then compaction when due and memory.auto_compact allows
    except Exception as e:  # whatever broke, the edit stands; `vmem compact` reports the cause in full
        reason = " ".join(str(e).split()) or type(e).__name__
        print(f"vmem: warning: edit committed; auto-compaction failed: {type(e).__name__}: {reason}; "
              f"run 'vmem compact'", file=sys.stderr)


def _query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files (local or s3://)")
    p.add_argument("--vectors", help="an .npy file of (n, dim) embeddings instead of images")
    p.add_argument("-k", "--k", type=positive_int, help="neighbours (default memory.k)")
    p.add_argument("--method", help="vote method (default memory.method)")
    p.add_argument("--json", action="store_true", help="print full JSON (neighbours included)")


def _inputs(args, dim: int):
    """(image paths, None) or (None, checked (n, dim) vectors) from the command line."""
    images = [a for a in args.images if "=" not in a]
    if args.vectors and images:
        raise UserError("give image files or --vectors F.npy, not both")
    if args.vectors:
        return None, load_vectors(args.vectors, dim)
    if not images:
        raise UserError("give image files or --vectors F.npy")
    return images, None


def _trust_line(p) -> str:
    """confidence, calibrated probability, OOD score (+ flag) and any abstain reason of a prediction."""
    parts = [f"share={p.confidence:.2f}", f"margin={p.margin:.2f}", f"ood={p.ood_score:.3f}"]
    if p.probability is not None:
        parts.insert(0, f"p={p.probability:.2f}")
    if p.ood:
        parts.append("OOD")
    if p.abstained:
        parts.append(f"abstained (vote said {p.voted_label}): {p.abstain_reason}")
    return " ".join(parts)


@command("classify", "classify images (or embedding vectors) by a kNN vote over the memory",
         "vmem classify --vectors work/queries.npy --k 10 --method rank", _query_args)
def cmd_classify(cfg: Config, args: argparse.Namespace) -> int:
    mem = _open(cfg)
    images, vectors = _inputs(args, mem.dim)
    preds = mem.classify(images=images, embeddings=vectors, k=args.k, method=args.method)
    names = images or [f"vector[{i}]" for i in range(len(preds))]
    for name, p in zip(names, preds):
        if args.json:
            print(json.dumps({"input": name, **p.to_dict()}))
        else:
            top = ", ".join(f"{n}={s:.3g}" for n, s in list(p.scores.items())[:3])
            print(f"{name}\t{p.label_name}\t({p.method}: {top})\t{_trust_line(p)}")
    return 0


def _explain_args(p: argparse.ArgumentParser) -> None:
    _query_args(p)
    p.add_argument("-o", "--out", default="explain.png", help="PNG sheet to write")


@command("explain", "write a picture of a query beside its neighbours, their distances, weights and votes",
         "vmem explain photo.png -o sheet.png --k 10", _explain_args)
def cmd_explain(cfg: Config, args: argparse.Namespace) -> int:
    mem = _open(cfg)
    images, vectors = _inputs(args, mem.dim)
    pred = mem.explain(image=images[0] if images else None, embedding=None if vectors is None else vectors[:1],
                       k=args.k, method=args.method, out=args.out)
    print(f"{pred.label_name}\t{args.out}")
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--vectors", help=".npy embeddings instead of images")
    p.add_argument("--label", type=label, action="append", required=True,
                   help="label, an integer >= 0 (once, or once per item)")
    p.add_argument("--label-name", help="name of the label (new classes)")
    p.add_argument("--key", action="append", help="external key per item (default: the file name)")
    p.add_argument("--source", default="cli", help="source recorded with the items (default cli)")


@command("add", "add labelled images or vectors to the memory (durable, visible to the next query)",
         "vmem add new.png --label 10 --label-name novel --key new-0001", _add_args)
def cmd_add(cfg: Config, args: argparse.Namespace) -> int:
    mem = _open(cfg)
    images, vectors = _inputs(args, mem.dim)
    n = len(images) if images else len(vectors)
    what = f"{n} image(s)" if images else f"{n} vector(s) in {args.vectors}"
    if len(args.label) not in (1, n):
        raise UserError(f"--label given {len(args.label)} times for {what}: give it once, or once per item")
    labels = args.label * n if len(args.label) == 1 else args.label
    keys = args.key or (images if images else None)
    if keys is None:
        raise UserError(f"--key is required (once per vector) when adding --vectors: {what}")
    if len(keys) != n:
        raise UserError(f"--key given {len(keys)} times for {what}: give it once per item")
    names = [args.label_name] * n if args.label_name else None
    ids = mem.add(images=images, embeddings=vectors, labels=labels, keys=keys, label_names=names,
                  sources=[args.source] * n)
    for k, i in zip(keys, ids):
        print(f"{i}\t{k}")
    _maintain(cfg, mem)
    mem.close()
    return 0


def _delete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", type=item_id, action="append", help="item id (repeatable)")
    p.add_argument("--label", type=label, help="delete every item with this label")
    p.add_argument("--source", help="delete every item from this source")


@command("delete", "delete items by id, label or source (durable; invisible to the next query)",
         "vmem delete --id 123456789", _delete_args)
def cmd_delete(cfg: Config, args: argparse.Namespace) -> int:
    mem = _open(cfg)
    n = mem.delete(ids=args.id, label=args.label, source=args.source)
    print(f"deleted {n} item(s); {mem.stats()['forgotten_pending_erasure']} deleted item(s) wait for "
          f"`vmem compact` to erase them")
    _maintain(cfg, mem)
    mem.close()
    return 0


def _compact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rewrite every shard even without changes")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for the grace period: erasure then runs at the next compaction")


@command("compact", "fold added items and deletions into new shards (manifest v+1) and erase deleted data",
         "vmem compact", _compact_args)
def cmd_compact(cfg: Config, args: argparse.Namespace) -> int:
    import time

    from pipeline.memory import erasure

    mem = _open(cfg)
    report = mem.compact(force=args.force)
    print(json.dumps(report, indent=1, default=str) if report else "nothing to compact")
    runs = [report["erasure"]] if report and isinstance(report.get("erasure"), dict) else []
    grace = float(cfg.memory.grace_period_s)
    if grace > 0 and not args.no_wait:
        print(f"waiting memory.grace_period_s={grace:g} s so readers of the old version finish, then erasing")
        time.sleep(grace)
    # The compaction drained the backlog a moment ago (unless it waited for the grace period): not twice.
    waited = grace > 0 and not args.no_wait
    st = erasure.drain(cfg.memory_dir, mem.state, cfg) if waited or not (report and report.get("erasure")) else {}
    if st.get("status") == "erased":
        r = st["report"]
        print(json.dumps({"erasure": {k: v for k, v in r.items() if k != "files_checked"},
                          "files_checked": len(r["files_checked"])}, indent=1))
        runs.append(r)
    elif st.get("status") == "deferred":  # an erasure that cannot run now says why and when it will
        print(json.dumps({"erasure": erasure.deferred_text(st)}, indent=1))
    upkeep = mem.state.maintain(force=True)  # an explicit maintenance command: the state tables too, now
    if upkeep:
        print(json.dumps({"state_upkeep": upkeep}, indent=1, default=str))
    return _erasure_exit(runs)


def _erasure_exit(runs: list) -> int:
    """0, or 2 when an erasure could not verify everything: one stderr line per file in doubt (what to do)."""
    bad = [r for r in runs if not r.get("verified", True)]
    for r in bad:
        for url, why in r.get("in_doubt_why", {}).items():
            print(f"vmem compact: erasure in doubt for {url}: {why}", file=sys.stderr)
        for where, n in r.get("found", {}).items():
            print(f"vmem compact: erasure verification found {n} erased id(s) still in {where}; run "
                  f"`vmem compact` again, then `vmem audit`", file=sys.stderr)
    return 2 if bad else 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-hard", action="store_true", help="skip hard pruning (tombstones)")
    p.add_argument("--no-soft", action="store_true", help="skip soft pruning (gamma overlay)")
    p.add_argument("--threshold", type=positive_int, help="hard pruning threshold (default memory.hard_prune_threshold)")
    p.add_argument("--dry-run", action="store_true")


@command("prune", "query the memory against itself on Ray; hard-prune (tombstone) and soft-prune (gamma)",
         "vmem prune --threshold 128", _prune_args)
def cmd_prune(cfg: Config, args: argparse.Namespace) -> int:
    r = _open(cfg).prune(hard=not args.no_hard, soft=not args.no_soft, threshold=args.threshold,
                         dry_run=args.dry_run)
    print(json.dumps({k: v for k, v in r.items() if k not in ("v_soft", "v_hard", "ids")}, indent=1))
    return 0


def _weight(text: str) -> float:
    w = float(text)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"a weight is a finite number >= 0, got {text}")
    return w


def _pairs(values, key_type, what, value_type=_weight):
    """{key: value} from KEY:VALUE arguments; a malformed one is a UserError naming the option."""
    out = {}
    for v in values or []:
        k, sep, w = v.partition(":")
        if not sep:
            raise UserError(f"{what} must look like KEY:VALUE, got {v!r}")
        try:
            out[key_type(k)] = value_type(w)
        except ValueError as e:
            raise UserError(f"{what} {v!r}: {e}") from None
    return out


def _pair_label(text: str) -> int:
    try:
        return label(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _pair_id(text: str) -> int:
    try:
        return item_id(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _intervene_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--item", action="append", help="ID:WEIGHT multiplier of one item's votes")
    p.add_argument("--label-weight", action="append", help="LABEL:WEIGHT multiplier of a class's votes")
    p.add_argument("--source-weight", action="append", help="SOURCE:WEIGHT multiplier of a source's votes")
    p.add_argument("--relabel", action="append", help="ID:LABEL override of an item's label")
    p.add_argument("--clear", action="store_true", help="start from no interventions")


@command("intervene", "weight or relabel items, classes or sources in the vote (versioned overlay)",
         "vmem intervene --label-weight 3:0.5 --source-weight web:0", _intervene_args)
def cmd_intervene(cfg: Config, args: argparse.Namespace) -> int:
    v = _open(cfg).intervene(item_weights=_pairs(args.item, _pair_id, "--item"),
                             label_weights=_pairs(args.label_weight, _pair_label, "--label-weight"),
                             source_weights=_pairs(args.source_weight, str, "--source-weight"),
                             relabel=_pairs(args.relabel, _pair_id, "--relabel", _pair_label), clear=args.clear)
    print(f"interventions version {v}")
    return 0


def _relabel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", type=item_id, action="append", required=True, help="item id (repeatable)")
    p.add_argument("--label", type=label, required=True, help="the new label (an integer >= 0)")
    p.add_argument("--label-name", help="its name (default: the memory's name for that label)")


@command("relabel", "give items a new label (an overlay the vote counts; undone by rollback)",
         "vmem relabel --id 123456789 --label 3", _relabel_args)
def cmd_relabel(cfg: Config, args: argparse.Namespace) -> int:
    n = _open(cfg).relabel(args.id, args.label, args.label_name)
    print(f"relabelled {n} item(s) as {args.label}")
    return 0


@command("versions", "the memory's edit history: version, time, operation, what changed", "vmem versions")
def cmd_versions(cfg: Config, args: argparse.Namespace) -> int:
    import datetime

    for e in _open(cfg).versions():
        at = datetime.datetime.fromtimestamp(e["at"]).isoformat(timespec="seconds")
        print(f"{e['version']:>5}  {at}  {e['op']:<10} {e['detail']}")
    return 0


def _rollback_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("version", type=positive_int, help="the version (from `vmem versions`) to go back to")


@command("rollback", "undo adds, relabels, interventions and prunes after a version (deletes stay final)",
         "vmem rollback 3", _rollback_args)
def cmd_rollback(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(_open(cfg).rollback(args.version), indent=1))
    return 0


@command("stats", "items, live items, shards, tombstones, delta, version, encoder of the memory", "vmem stats")
def cmd_stats(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(_open(cfg).stats(), indent=1))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", choices=["add_class", "delete_class", "pruning", "paper", "ood", "rerank"],
                   help="run a study instead (paper: each claim of the paper with our numbers and a verdict)")
    p.add_argument("--label", type=label, help="class for add_class / delete_class / paper (default: first query's)")
    p.add_argument("--queries", type=positive_int, default=200, help="query images of the rerank study")
    p.add_argument("--no-exact", action="store_true", help="skip the exact (flat) search baseline")
    p.add_argument("--no-ood", action="store_true", help="skip the OOD study (one held-out class at a time)")


@command("eval", "accuracy@k of every vote method (ANN and exact), calibration (ECE, reliability) and the OOD "
         "study over eval.split; CSV + PNG; or a study", "vmem eval eval.max_queries=500", _eval_args)
def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.eval.trust import TRUST_STUDIES, evaluate_trust, run_trust_study

    if args.study in TRUST_STUDIES:
        print(run_trust_study(cfg, args.study, args.label, n=args.queries))
        return 0
    if args.study:
        from pipeline.eval.studies import format_study, run_study

        print(format_study(run_study(cfg, args.study, args.label)))
        return 0
    from pipeline.eval.accuracy import evaluate

    mem = _open(cfg)
    table = evaluate(cfg, mem.snapshot(), exact=not args.no_exact)
    print(table.format())
    print()
    print(evaluate_trust(cfg, mem.snapshot(), ood=not args.no_ood))
    return 0


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ids", help="file of ids (JSON list or one per line) to look for too, also as raw int64 bytes")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming an interrupted audit")


@command("audit", "scan every file under the workdir (local or s3://, Ray tasks, resumable) for traces of erased "
         "items and check the manifest's checksums; exit 1 on a trace, 2 when a file cannot be read or is "
         "corrupt", "vmem audit", _audit_args)
def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline.memory.audit import format_report, read_ids, run_audit
    from pipeline.runtime import init_ray

    ids = read_ids(args.ids)
    init_ray(cfg)
    report = run_audit(cfg.memory_dir, cfg, ids=ids, restart=args.restart)
    lines = format_report(report)
    print(lines[0])
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return 1 if report["traces"] else (2 if report["unreadable"] or report["corrupt"] else 0)
