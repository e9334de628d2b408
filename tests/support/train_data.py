"""A small, learnable Alpaca-format data set for the train stage's tests (made here, no download)."""

from __future__ import annotations

import random
from pathlib import Path

from alpaca_ray.records import AlpacaRecord, write_records

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "lion", "mouse", "sheep"]


def make_records(count: int = 48, seed: int = 0) -> list[AlpacaRecord]:
    """Short examples of a few fixed patterns (half with an input, half without), so loss falls fast."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
        if i % 2:
            records.append(AlpacaRecord(instruction="Repeat the word three times.", input=animal,
                                        output=f"{animal} {animal} {animal}"))
        else:
            records.append(AlpacaRecord(instruction=f"Name the color of the {color} {animal}.",
                                        output=f"The {animal} is {color}."))
    return records


def write_dataset(path: Path, count: int = 48, seed: int = 0) -> Path:
    write_records(make_records(count, seed), path)
    return path


def make_colour_records(count: int = 48) -> list[AlpacaRecord]:
    """A toy task for adapters: name the colour of a number (each of the 8 colours, in turn)."""
    return [AlpacaRecord(instruction=f"Name colour number {i % len(COLORS)}.",
                         output=f"Colour {i % len(COLORS)} is {COLORS[i % len(COLORS)]}.")
            for i in range(count)]


def write_colour_dataset(path: Path, count: int = 48) -> Path:
    write_records(make_colour_records(count), path)
    return path
