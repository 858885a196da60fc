"""A map-style dataset over one split of a sample directory, indexed by stream position.

``dataset[q]`` is the q-th sample of the split's infinite stream (epochs concatenated): which sample and
mask variant it holds depends only on q, the seed and the directory, so batches are the same for any
number of DataLoader workers and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from data_tools.errors import DataError
from data_tools.objectives import ObjectiveConfig
from data_tools.sample_reader import SampleDirectory
from data_tools.tokenizer import GLMTokenizer, load_tokenizer


class GLMDataset(Dataset):
    """Laid-out GLM samples (Part A with one mask per span, then the spans in Part B; see ``build_glm_layout``), padded to the directory's sequence length.

    Args:
        directory: a ``SampleDirectory`` or its path (corpora are checked against their fingerprints).
        split: "train", "valid" or "test".
        tokenizer: the model's tokenizer (name, path or object); must match the one the samples were built for.
        objectives: the objective configuration; defaults to the one recorded at build. With precomputed
            masks it must equal that one (it also holds the layout options: task mask, span shuffling,
            block positions, [dBLOCK]); with ``online`` masking it drives the span sampler.
        online: draw spans on the fly (variant = pass over the corpus) instead of reading variant ``pass mod K``.
        shuffle: shuffle each epoch (default: only the train split).
    """

    def __init__(
        self,
        directory: SampleDirectory | str | Path,
        split: str,
        tokenizer: GLMTokenizer | str,
        *,
        objectives: ObjectiveConfig | None = None,
        online: bool = False,
        shuffle: bool | None = None,
    ):
        self.directory = directory if isinstance(directory, SampleDirectory) else SampleDirectory(directory)
        tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.directory.check_tokenizer(tokenizer)
        self.command = tokenizer.command
        self.samples = self.directory.split(split)
        self.objectives = objectives if objectives is not None else self.directory.objectives
        self.online = online
        _check_objectives(self.objectives, self.directory, online)
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.seq_length = self.directory.seq_length

    def __len__(self) -> int:
        """Samples per epoch (the stream itself is unbounded)."""
        return len(self.samples)

    def __getitem__(self, position: int) -> dict[str, np.ndarray | int]:
        ref = self.samples.locate(int(position), self.shuffle)
        draw = self.samples.draw(ref, self.objectives if self.online else None)
        layout = self.samples.layout(ref, draw, self.command, self.objectives)
        return {
            "tokens": layout.tokens,
            "targets": layout.targets,
            "loss_mask": layout.loss_mask,
            "position_ids": layout.position_ids,
            "sep": layout.sep,
            "objective": int(draw.objective),
        }


def _check_objectives(objectives: ObjectiveConfig, directory: SampleDirectory, online: bool) -> None:
    # The settings themselves were validated where they entered (the config, glm-build-samples); here
    # only their agreement with what the directory was built with.
    if online:
        return
    built = dataclasses.asdict(directory.objectives)
    differing = {k: (built[k], v) for k, v in dataclasses.asdict(objectives).items() if built[k] != v}
    if differing:
        details = ", ".join(f"{k} (built {b!r}, requested {r!r})" for k, (b, r) in differing.items())
        raise DataError(
            f"{directory.path} was built with other objective settings: {details}; rebuild the samples "
            "with these settings or enable online masking"
        )
