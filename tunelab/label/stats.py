"""`tunelab label --stats`: what a labels file holds.

- per labeler: labels, preferences, ties and skips, tie and skip rates;
- agreement on items labeled by two (or more) labelers: each pair of labels of one item is compared as one
  of three verdicts about the item's two responses (the first better, the second better, a tie; the order is
  fixed by source and text, not by the side shown), with Cohen's kappa over those pairs (the earlier label of
  a pair as rater 1); pairs where either label is a skip are counted and left out;
- per source: wins, losses and ties (skips left out), and its win rate with ties counted half.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

from tunelab.label.store import read_rows

VERDICTS = ("first", "second", "tie")


def _verdict(row: dict) -> str | None:
    """The label as a verdict about the item's two responses in a fixed order; None for a skip."""
    choice = row.get("choice")
    if choice == "skip":
        return None
    if choice == "tie":
        return "tie"
    chosen = (str(row.get("chosen_source", "")), str(row.get("chosen", "")))
    rejected = (str(row.get("rejected_source", "")), str(row.get("rejected", "")))
    return "first" if chosen <= rejected else "second"


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of (rater 1, rater 2) verdicts; None when chance agreement is total (kappa undefined)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[v] * second[v] for v in set(first) | set(second)) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def label_stats(path: str) -> dict:
    """The figures of a labels file, as a dict (see the module docstring)."""
    rows, _ = read_rows(path)
    labels = [row for row in rows if row.get("choice") in ("A", "B", "tie", "skip")]
    per_labeler: dict[str, Counter] = defaultdict(Counter)
    for row in labels:
        counts = per_labeler[str(row.get("labeler", "?"))]
        counts["labels"] += 1
        counts[{"A": "preferred", "B": "preferred"}.get(row["choice"], row["choice"])] += 1
    labelers = {name: {"labels": c["labels"], "preferred": c["preferred"], "ties": c["tie"], "skips": c["skip"],
                       "tie_rate": c["tie"] / c["labels"], "skip_rate": c["skip"] / c["labels"]}
                for name, c in sorted(per_labeler.items())}

    by_item: dict[str, list[dict]] = defaultdict(list)
    for row in labels:
        by_item[str(row.get("item", row.get("prompt")))].append(row)
    compared, with_skip = [], 0
    per_pair: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    items_twice = 0
    for item_rows in by_item.values():
        item_rows = sorted(item_rows, key=lambda r: str(r.get("time", "")))
        if len({r.get("labeler") for r in item_rows}) < 2:
            continue
        items_twice += 1
        for one, two in combinations(item_rows, 2):
            if one.get("labeler") == two.get("labeler"):
                continue
            a, b = _verdict(one), _verdict(two)
            if a is None or b is None:
                with_skip += 1
                continue
            compared.append((a, b))
            per_pair[tuple(sorted((str(one["labeler"]), str(two["labeler"]))))].append((a, b))
    agreement = {"items": items_twice, "pairs": len(compared), "pairs_with_skip": with_skip,
                 "agreed": sum(a == b for a, b in compared),
                 "rate": sum(a == b for a, b in compared) / len(compared) if compared else None,
                 "kappa": cohen_kappa(compared),
                 "by_labelers": {f"{x} / {y}": {"pairs": len(p), "rate": sum(a == b for a, b in p) / len(p),
                                                "kappa": cohen_kappa(p)} for (x, y), p in sorted(per_pair.items())}}

    sources: dict[str, Counter] = defaultdict(Counter)
    for row in labels:
        chosen, rejected = str(row.get("chosen_source", "?")), str(row.get("rejected_source", "?"))
        if row["choice"] == "tie":
            sources[chosen]["ties"] += 1
            sources[rejected]["ties"] += 1
        elif row["choice"] in ("A", "B"):
            sources[chosen]["wins"] += 1
            sources[rejected]["losses"] += 1
    wins = {}
    for name, c in sorted(sources.items()):
        games = c["wins"] + c["losses"] + c["ties"]
        wins[name] = {"wins": c["wins"], "losses": c["losses"], "ties": c["ties"],
                      "win_rate": (c["wins"] + c["ties"] / 2) / games if games else None}
    return {"file": str(path), "labels": len(labels), "items": len(by_item), "other_rows": len(rows) - len(labels),
            "labelers": labelers, "agreement": agreement, "sources": wins}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in
                      enumerate(zip(line, widths))).rstrip() for line in [header, *rows]]


def format_stats(stats: dict) -> str:
    """The figures as the text `tunelab label --stats` prints."""
    lines = [f"{stats['file']}: {stats['labels']} labels of {stats['items']} items by {len(stats['labelers'])} "
             f"labelers" + (f" ({stats['other_rows']} other rows ignored)" if stats["other_rows"] else "")]
    if stats["labelers"]:
        lines += ["", *_table(["labeler", "labels", "preferred", "ties", "skips", "tie rate", "skip rate"],
                              [[name, s["labels"], s["preferred"], s["ties"], s["skips"], _percent(s["tie_rate"]),
                                _percent(s["skip_rate"])] for name, s in stats["labelers"].items()])]
    agreement = stats["agreement"]
    lines.append("")
    if agreement["pairs"]:
        lines.append(f"agreement on {agreement['items']} items labeled by two labelers: {agreement['agreed']} of "
                     f"{agreement['pairs']} label pairs agree ({_percent(agreement['rate'])}), Cohen's kappa "
                     f"{_number(agreement['kappa'])} (verdicts: first better, second better, tie)"
                     + (f"; {agreement['pairs_with_skip']} pairs with a skip left out"
                        if agreement["pairs_with_skip"] else ""))
        if len(agreement["by_labelers"]) > 1:
            lines += _table(["labelers", "pairs", "agree", "kappa"],
                            [[name, p["pairs"], _percent(p["rate"]), _number(p["kappa"])]
                             for name, p in agreement["by_labelers"].items()])
    else:
        lines.append("agreement: no item labeled by two labelers (and not skipped by either); "
                     "use --overlap K to ask K items of two labelers")
    if stats["sources"]:
        lines += ["", *_table(["source", "wins", "losses", "ties", "win rate (ties half)"],
                              [[name, s["wins"], s["losses"], s["ties"], _percent(s["win_rate"])]
                               for name, s in stats["sources"].items()])]
    return "\n".join(lines)
