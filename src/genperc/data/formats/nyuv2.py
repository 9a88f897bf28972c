"""NYU Depth v2, the labeled set (``nyu_depth_v2_labeled.mat``, 1,449 RGB-D frames).

The file is MATLAB v7.3, i.e. HDF5, read with h5py. MATLAB stores column-major, so h5py sees the
axes reversed: ``images`` is ``[N, 3, W, H]`` uint8 and ``depths`` ``[N, W, H]`` float metres
(``labels`` ``[N, W, H]`` uint16 with 0 = unlabeled, ``names`` a cell array of class names).

Splits: the official ``splits.mat`` (MATLAB v5) holds ``trainNdxs`` (795) and ``testNdxs`` (654),
1-based. Pass it as ``split_file`` (a ``splits.mat`` next to the ``.mat`` is picked up), or give
0-based ``indices`` yourself, or ``split="all"``.

Evaluation protocol (REFERENCE.md, "Marigold (depth) and its evaluation"), the default: valid
depth is the open range (1e-3, 10) m, and the Eigen crop keeps rows 45:471 and columns 41:601 of
the 480x640 frame. The crop is folded into ``depth_valid`` (``eigen_crop=False`` turns it off, e.g.
for frames of another size); :func:`eigen_crop_mask` exposes it. The source's ``depth_range`` is
the valid range, which the depth task adopts for its metric clipping unless the run sets
``task_options.min_depth`` / ``max_depth``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from genperc.data.formats.common import existing
from genperc.data.record import SceneRecord
from genperc.errors import UserError

MIN_DEPTH = 1e-3
MAX_DEPTH = 10.0
EIGEN_CROP = (45, 471, 41, 601)  # rows y0:y1, columns x0:x1 of a 480x640 frame
FRAME_HW = (480, 640)
NUM_RAW_LABELS = 894  # classes in the labeled set's ``labels`` (1..894; 0 = unlabeled)


def eigen_crop_mask(height: int = 480, width: int = 640) -> np.ndarray:
    """bool [H, W], True inside the Eigen crop ``[45:471, 41:601]`` (defined for 480x640)."""
    if (height, width) != FRAME_HW:
        raise UserError(f"the Eigen crop is defined for 480x640 frames, not {width}x{height}",
                        "apply it at the original NYUv2 resolution")
    m = np.zeros((height, width), dtype=bool)
    y0, y1, x0, x1 = EIGEN_CROP
    m[y0:y1, x0:x1] = True
    return m


def read_split_indices(split_file, split: str) -> list[int]:
    """0-based indices of ``split`` (``train``/``test``) from an official ``splits.mat``."""
    path = existing(split_file, "NYUv2 split file")
    key = {"train": "trainNdxs", "test": "testNdxs"}.get(split)
    if key is None:
        raise UserError(f"NYUv2 split file has no split '{split}'", "use 'train' or 'test'")
    data = None
    try:
        import scipy.io

        data = {k: np.asarray(v) for k, v in scipy.io.loadmat(path).items()
                if not k.startswith("__")}
    except (ValueError, NotImplementedError, OSError):
        import h5py

        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                data = {k: np.asarray(f[k]) for k in f.keys()}
    if data is None:
        raise UserError(f"cannot read NYUv2 split file {path}", "expected splits.mat with "
                        "trainNdxs and testNdxs")
    if key not in data:
        raise UserError(f"NYUv2 split file {path} has no '{key}'",
                        f"it has {', '.join(sorted(data))}")
    idx = np.asarray(data[key]).reshape(-1).astype(np.int64) - 1
    return idx.tolist()


class NYUv2Source:
    """NYUv2 labeled frames as a :class:`~genperc.data.record.SceneSource`.

    ``semantic=True`` also fills ``semantic`` from ``labels`` (raw 894-class labels, 0 → -1,
    k → k-1), with ``categories`` from ``names``. ``depth_range`` = (``min_depth``, ``max_depth``),
    the valid depth in metres (exclusive); the Eigen crop is on by default (module docstring).
    """

    def __init__(self, path, split: str = "test", split_file=None, indices=None,
                 min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
                 eigen_crop: bool = True, semantic: bool = False):
        import h5py

        self.path = existing(path, "NYUv2 .mat file",
                             "expected nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)")
        if not h5py.is_hdf5(self.path):
            raise UserError(f"{self.path} is not an HDF5 (MATLAB v7.3) file",
                            "use nyu_depth_v2_labeled.mat as published; it is MATLAB v7.3")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.depth_range = (self.min_depth, self.max_depth)
        self.eigen_crop = bool(eigen_crop)
        self.semantic = bool(semantic)
        self._file = None
        self._pid = None
        f = self._h5()
        for key in ("images", "depths") + (("labels",) if semantic else ()):
            if key not in f:
                raise UserError(f"{self.path} has no dataset '{key}'",
                                "is this nyu_depth_v2_labeled.mat?")
        n, c = f["images"].shape[:2]
        if c != 3 or f["depths"].shape[0] != n or f["images"].ndim != 4:
            raise UserError(f"{self.path}: images {f['images'].shape} / depths "
                            f"{f['depths'].shape} do not have the labeled-set layout",
                            "expected images [N,3,W,H] and depths [N,W,H]")
        if indices is not None:
            self.indices = [int(i) for i in indices]
        elif split == "all":
            self.indices = list(range(n))
        else:
            if split_file is None and (self.path.parent / "splits.mat").exists():
                split_file = self.path.parent / "splits.mat"
            if split_file is None:
                raise UserError(f"no split file for NYUv2 split '{split}'",
                                "pass split_file=splits.mat (trainNdxs/testNdxs), "
                                "indices=[...], or split='all'")
            self.indices = read_split_indices(split_file, split)
        frame_hw = tuple(f["depths"].shape[:0:-1])
        if self.eigen_crop and frame_hw != FRAME_HW:
            raise UserError(f"the Eigen crop is defined for 480x640 frames; {self.path.name} has "
                            f"{frame_hw[0]}x{frame_hw[1]} frames",
                            "set data.options.eigen_crop=false for frames of another size")
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise UserError(f"NYUv2 indices out of range for {n} frames: {bad[:5]}",
                            "indices are 0-based in `indices`, 1-based in splits.mat")
        self.split = split
        self.categories = self._read_names(f) if semantic else []

    # h5py handles must not cross a fork: reopen per process, drop when pickled
    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def _read_names(self, f) -> list[str]:
        names = []
        if "names" in f:
            try:
                for ref in np.asarray(f["names"]).reshape(-1):
                    chars = np.asarray(f[ref]).reshape(-1)
                    names.append("".join(chr(int(c)) for c in chars))
            except (TypeError, ValueError, KeyError):
                names = []
        return names or [f"class_{k}" for k in range(1, NUM_RAW_LABELS + 1)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> SceneRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        j = self.indices[index]
        f = self._h5()
        image = np.ascontiguousarray(np.asarray(f["images"][j]).transpose(2, 1, 0), dtype=np.uint8)
        depth = np.ascontiguousarray(np.asarray(f["depths"][j], dtype=np.float32).T)
        valid = np.isfinite(depth) & (depth > self.min_depth) & (depth < self.max_depth)
        if self.eigen_crop:
            valid &= eigen_crop_mask(*depth.shape)
        semantic = None
        if self.semantic:
            semantic = np.asarray(f["labels"][j]).T.astype(np.int32) - 1
        return SceneRecord(
            image=image, depth=depth, depth_valid=valid, semantic=semantic,
            meta={"source": "nyuv2", "split": self.split, "frame": j,
                  "file_name": Path(self.path).name, "eigen_crop": self.eigen_crop,
                  "depth_range": [self.min_depth, self.max_depth]},
        )
