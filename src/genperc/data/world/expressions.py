"""Referring expressions for the shapes world, each verified to pick out exactly one object.

Three template families of increasing difficulty (CLEVR-Ref+ style), recorded per expression so
that evaluation can be split by it:

* ``attribute`` — a minimal unique attribute description: the fewest of size / colour / material /
  shape that single the object out ("the large red metal cube", "the sphere"), plus the full
  description when that is not already minimal.
* ``relation`` — one hop from a uniquely described anchor: "the sphere left of the green
  cylinder", with the target described minimally among the objects in that relation.
* ``ordinal`` — "the second cube from the left": rank along a camera-relative direction among the
  objects sharing a description; the rank must be separated from its neighbours by the relation
  margin, or the expression is rejected.

Every expression carries a small ``program``; :func:`evaluate` runs it against the scene and
generation keeps an expression only if the result is exactly its object.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from genperc.data.world.relations import PHRASES, RELATIONS

ATTRIBUTES = ("size", "color", "material", "shape")  # also the word order
ORDINALS = ("first", "second", "third", "fourth", "fifth")
ORDER_WORDS = {"left": "left", "right": "right", "front": "front", "behind": "back"}
FAMILIES = ("attribute", "relation", "ordinal")
_ORDINAL_FILTERS = ((), ("shape",), ("color",), ("color", "shape"), ("size", "shape"),
                    ("material", "shape"))
_SUBSETS = [s for k in range(len(ATTRIBUTES) + 1) for s in combinations(ATTRIBUTES, k)]


def noun_phrase(values: dict) -> str:
    """"large red metal cube", "red object", "object": the given attributes in canonical order."""
    words = [values[a] for a in ("size", "color", "material") if a in values]
    return " ".join(words + [values.get("shape", "object")])


def matches(obj: dict, filt: dict) -> bool:
    return all(obj[k] == v for k, v in filt.items())


def _filter(obj: dict, attrs) -> dict:
    return {a: obj[a] for a in attrs}


# --------------------------------------------------------------------------- evaluation


def evaluate(program: dict, objects: list[dict], relations: dict, directions: dict,
             margin: float) -> list[int]:
    """The ids of the objects a program refers to (exactly one for a valid expression).

    ``objects``: dicts with id, size, color, material, shape, position; ``relations[name][k]``:
    ids that are ``name`` of ``objects[k]``; ``directions``: ground unit vectors by name.
    """
    cands = [o for o in objects if matches(o, program["filter"])]
    if "relation" in program:
        anchors = evaluate(program["anchor"], objects, relations, directions, margin)
        by_id = {o["id"]: relations[program["relation"]][k] for k, o in enumerate(objects)}
        related = {j for a in anchors for j in by_id[a]}
        return [o["id"] for o in cands if o["id"] in related and o["id"] not in anchors]
    if "ordinal" in program:
        return _ordinal(cands, program["ordinal"], directions[program["from"]], margin)
    return [o["id"] for o in cands]


def _ordinal(cands: list[dict], k: int, direction, margin: float) -> list[int]:
    """The k-th (1-based) object counted from ``direction``; every tie within the margin if ambiguous."""
    if k > len(cands):
        return []
    v = np.array([np.dot(o["position"], direction) for o in cands])
    order = np.argsort(-v, kind="stable")
    v_sorted = v[order]
    i = k - 1
    clear_before = i == 0 or v_sorted[i - 1] - v_sorted[i] > margin
    clear_after = i + 1 >= len(cands) or v_sorted[i] - v_sorted[i + 1] > margin
    if clear_before and clear_after:
        return [cands[order[i]]["id"]]
    return [cands[j]["id"] for j in order if abs(v[j] - v_sorted[i]) <= margin]


# --------------------------------------------------------------------------- generation


def _minimal_subsets(target: dict, pool: list[dict]) -> list[tuple[str, ...]]:
    """The smallest attribute subsets that match ``target`` and nothing else in ``pool``."""
    for k in range(len(ATTRIBUTES) + 1):
        found = [s for s in _SUBSETS if len(s) == k
                 and [o["id"] for o in pool if matches(o, _filter(target, s))] == [target["id"]]]
        if found:
            return found
    return []


def _pick(rng: np.random.Generator, preferred: list, others: list, n: int) -> list:
    """Up to n candidates: the preferred ones first, each group in a seeded random order."""
    out = [preferred[i] for i in rng.permutation(len(preferred))]
    out += [others[i] for i in rng.permutation(len(others))]
    return out[:n]


def _attribute_candidates(o, objects, minimal):
    cands = [({"filter": _filter(o, s)}, f"the {noun_phrase(_filter(o, s))}") for s in minimal]
    full = tuple(ATTRIBUTES)
    if minimal and full not in minimal:
        cands.append(({"filter": _filter(o, full)}, f"the {noun_phrase(_filter(o, full))}"))
    return cands[: len(minimal)], cands[len(minimal):]


def _relation_candidates(o, objects, relations, minimal_by_id):
    preferred, others = [], []
    globally_unique = {s for s in _SUBSETS
                       if [x["id"] for x in objects if matches(x, _filter(o, s))] == [o["id"]]}
    for k, a in enumerate(objects):
        if a["id"] == o["id"] or not minimal_by_id[a["id"]]:
            continue
        anchor_attrs = minimal_by_id[a["id"]][0]
        anchor = {"filter": _filter(a, anchor_attrs)}
        for r in RELATIONS:
            group = [x for x in objects if x["id"] in relations[r][k]]
            if o["id"] not in [x["id"] for x in group]:
                continue
            for s in _minimal_subsets(o, group):
                program = {"filter": _filter(o, s), "relation": r, "anchor": anchor}
                text = (f"the {noun_phrase(_filter(o, s))} {PHRASES[r]} "
                        f"the {noun_phrase(anchor['filter'])}")
                (others if s in globally_unique else preferred).append((program, text))
    return preferred, others


def _ordinal_candidates(o, objects, directions, margin):
    preferred, others = [], []
    for attrs in _ORDINAL_FILTERS:
        filt = _filter(o, attrs)
        group = [x for x in objects if matches(x, filt)]
        if len(group) < 2:
            continue
        for d in RELATIONS:
            v = sorted((float(np.dot(x["position"], directions[d])), x["id"]) for x in group)[::-1]
            rank = [i for _, i in v].index(o["id"]) + 1
            if rank > len(ORDINALS):
                continue
            program = {"filter": filt, "ordinal": rank, "from": d}
            text = f"the {ORDINALS[rank - 1]} {noun_phrase(filt)} from the {ORDER_WORDS[d]}"
            (preferred if "shape" in attrs else others).append((program, text))
    return preferred, others


def generate_expressions(objects: list[dict], relations: dict, directions: dict, margin: float,
                         rng: np.random.Generator, per_family: int = 2) -> list[dict]:
    """Expressions for every object: up to ``per_family`` per template family, all verified.

    Returns dicts ``{"id", "text", "object_ids": [id], "family", "program"}`` in object order.
    """
    minimal_by_id = {o["id"]: _minimal_subsets(o, objects) for o in objects}
    out: list[dict] = []
    for o in objects:
        families = {
            "attribute": _attribute_candidates(o, objects, minimal_by_id[o["id"]]),
            "relation": _relation_candidates(o, objects, relations, minimal_by_id),
            "ordinal": _ordinal_candidates(o, objects, directions, margin),
        }
        for family in FAMILIES:
            preferred, others = families[family]
            seen: set[str] = set()
            kept = 0
            for program, text in _pick(rng, preferred, others, len(preferred) + len(others)):
                if kept == per_family or text in seen:
                    continue
                if evaluate(program, objects, relations, directions, margin) != [o["id"]]:
                    continue  # ambiguous or empty: rejected (CLEVR-Ref+)
                seen.add(text)
                kept += 1
                out.append({"id": len(out), "text": text, "object_ids": [o["id"]],
                            "family": family, "program": program})
    return out
