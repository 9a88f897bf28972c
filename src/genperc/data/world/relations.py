"""Camera-relative spatial relations with CLEVR's margin rule.

The four directions are the camera's axes projected onto the floor (z = 0): ``behind`` points away
from the camera, ``front`` towards it, ``right`` / ``left`` along the image's x axis. Object j is
``left`` of object i when ``(p_j - p_i) · left > margin`` (CLEVR: margin 0.2); likewise for the
others. Pairs closer than the margin along a direction are in neither relation of that axis.
"""

from __future__ import annotations

import numpy as np

RELATIONS = ("left", "right", "front", "behind")
PHRASES = {"left": "left of", "right": "right of", "front": "in front of", "behind": "behind"}


def ground_directions(origin, target) -> dict[str, np.ndarray]:
    """Unit vectors on the floor for left / right / front / behind, seen from the camera."""
    forward = np.asarray(target, dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    behind = np.array([forward[0], forward[1], 0.0])
    norm = np.linalg.norm(behind)
    if norm < 1e-9:
        raise ValueError("a camera looking straight down has no front/behind on the floor")
    behind /= norm
    right = np.array([behind[1], -behind[0], 0.0])  # behind × up, up = +z
    return {"left": -right, "right": right, "front": -behind, "behind": behind}


def relations(positions, directions: dict[str, np.ndarray], margin: float = 0.2) -> dict[str, list[list[int]]]:
    """CLEVR-style relations: ``rel[name][i]`` lists the indices j that are ``name`` of object i."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    out: dict[str, list[list[int]]] = {}
    for name in RELATIONS:
        coord = p @ directions[name]  # [n]
        delta = coord[None, :] - coord[:, None]  # delta[i, j] = (p_j - p_i) · dir
        out[name] = [[int(j) for j in np.flatnonzero(delta[i] > margin) if j != i] for i in range(len(p))]
    return out
