"""A GGUF file (llama.cpp's format) made into a standard Hugging Face model directory.

transformers reads GGUF through the ``gguf`` package, dequantizing the weights, but refuses to
``save_pretrained`` a model loaded that way. The model is therefore rebuilt from its config around the
dequantized state dict (the same tensors, not a copy), which saves like any other model.

The file is checked first with a small reader of GGUF's header (the format is a short spec, and
``gguf.GGUFReader`` would spend seconds decoding every vocabulary string), so that a missing, foreign or
truncated file fails at once with a clear message rather than deep inside transformers.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

from alpaca_ray.config import UserError

#: The dtypes ``--dtype`` offers for the saved weights; the first is the default.
DTYPES = ("bfloat16", "float32")

#: Metadata keys that hold an end-of-sequence id (llama.cpp's "end of generation" tokens), in the order kept.
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has written v3 since 2023, transformers reads v2 and v3
_DEFAULT_ALIGNMENT = 32
#: GGUF metadata value types: id -> struct format of a scalar (8 is a string, 9 an array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class GGUFHeader:
    """What a GGUF file says about itself before its tensor data."""

    path: str
    version: int
    #: Metadata keys -> values; an array of strings is kept as its length only (a vocabulary is large).
    metadata: dict[str, Any]
    tensor_count: int
    #: Bytes the file must have to hold every tensor its table lists.
    required_size: int

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence ids the metadata names (EOS, end of turn, end of message), in that order."""
        return [self.metadata[key] for key in EOS_KEYS if isinstance(self.metadata.get(key), int)]


class _Corrupt(Exception):
    """The header runs past the end of the file or holds impossible values."""


class _Cursor:
    def __init__(self, buffer, size: int):
        self.buffer, self.size, self.pos = buffer, size, 0

    def unpack(self, fmt: str):
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise _Corrupt(f"its header runs past the end of the file (at byte {self.pos:,})")
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += width
        return values[0] if len(values) == 1 else values

    def skip(self, count: int) -> None:
        if count < 0 or self.pos + count > self.size:
            raise _Corrupt(f"its header runs past the end of the file (at byte {self.pos:,})")
        self.pos += count

    def string(self) -> str:
        length = self.unpack("<Q")
        start = self.pos
        self.skip(length)
        try:
            return bytes(self.buffer[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Corrupt(f"a string at byte {start} is not UTF-8") from err

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type == _STRING:
                for _ in range(count):
                    self.skip(self.unpack("<Q"))
                return count
            if element_type not in _SCALARS:
                raise _Corrupt(f"an array at byte {self.pos} has unknown element type {element_type}")
            width = struct.calcsize(_SCALARS[element_type])
            if count * width > self.size - self.pos:
                raise _Corrupt(f"an array at byte {self.pos} runs past the end of the file")
            values = list(struct.unpack_from(f"<{count}{_SCALARS[element_type][1]}", self.buffer, self.pos))
            self.pos += count * width
            return values
        raise _Corrupt(f"a metadata value at byte {self.pos} has unknown type {value_type}")


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (no tensor data), checking that the file is whole.

    Raises ``UserError`` naming the file for a missing file, a file that is not GGUF, and a truncated one.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (give the path of a .gguf model file)")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a GGUF file (give the path of the .gguf file in it)")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path} is empty, not a GGUF file")
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head != _MAGIC:
            raise UserError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF' "
                            f"(it starts with {head!r}); --from-gguf reads llama.cpp's .gguf model files")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            try:
                return _parse_header(path, buffer, size)
            except _Corrupt as err:
                raise UserError(f"{path} is a truncated or corrupt GGUF file ({size:,} bytes): {err}; "
                                f"copy or download it again") from None


def _parse_header(path: str, buffer, size: int) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cursor = _Cursor(buffer, size)
    cursor.skip(4)
    version = cursor.unpack("<I")
    if version not in _VERSIONS:
        raise UserError(f"{path} is GGUF version {version}; only versions {' and '.join(map(str, _VERSIONS))} "
                        f"can be read (convert it again with a current llama.cpp)")
    tensor_count, kv_count = cursor.unpack("<QQ")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    if not isinstance(metadata.get("general.architecture"), str):
        raise UserError(f"{path} has no general.architecture in its GGUF metadata, so it is not a model file")

    data_end = 0
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.unpack("<I")
        if dims > 8:
            raise _Corrupt(f"tensor {name!r} claims {dims} dimensions")
        shape = [cursor.unpack("<Q") for _ in range(dims)]
        ggml_type, offset = cursor.unpack("<IQ")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        elements = 1
        for dim in shape:
            elements *= dim
        data_end = max(data_end, offset + elements // block * block_bytes)
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = (cursor.pos + alignment - 1) // alignment * alignment
    required = data_start + data_end
    if size < required:
        raise _Corrupt(f"its {tensor_count} tensors need {required:,} bytes")
    return GGUFHeader(path, version, metadata, tensor_count, required)


@dataclasses.dataclass
class GGUFConversion:
    """What ``convert_gguf`` wrote."""

    output_dir: str
    architecture: str
    model_class: str
    parameters: int
    dtype: str
    tied_embeddings: bool
    eos_token_ids: list[int]
    chat_template: bool

    def summary(self) -> str:
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids
        return (f"wrote {self.output_dir}: {self.architecture} ({self.model_class}), {self.parameters:,} parameters "
                f"in {self.dtype}, {'tied' if self.tied_embeddings else 'untied'} embeddings, "
                f"eos_token_id {eos}, chat template {'kept' if self.chat_template else 'none in the file'}")


def ordered_unique_ids(*sources: int | Iterable[int] | None) -> list[int]:
    """Every id in ``sources`` (each an id, a list of ids or None), each once, in first-seen order."""
    ids: list[int] = []
    for source in sources:
        for token_id in ([source] if isinstance(source, int) else source or []):
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids


def _say(message: str) -> None:
    print(f"[init-model] {message}", file=sys.stderr, flush=True)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def convert_gguf(gguf_file: str, output_dir: str, dtype: str = DTYPES[0],
                 say: Callable[[str], None] = _say) -> GGUFConversion:
    """Write ``output_dir``: safetensors weights in ``dtype``, config, tokenizer (with its chat template) and
    a generation config whose ``eos_token_id`` lists every end-of-sequence id the file and tokenizer name."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output {output_dir} is a file; give a directory to write the model to")
    header = read_gguf_header(gguf_file)
    architecture = header.architecture
    say(f"reading {gguf_file} ({os.path.getsize(gguf_file) / 1e6:.1f} MB, GGUF v{header.version}): "
        f"architecture {architecture}, {header.tensor_count} tensor{'' if header.tensor_count == 1 else 's'}")

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        raise UserError(f"{gguf_file}: transformers {transformers.__version__} cannot load GGUF models of "
                        f"architecture {architecture!r} ({_one_line(err)})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{gguf_file}: architecture {architecture!r} (transformers model type "
                        f"{config.model_type!r}) is not a causal language model, so it cannot be a base model")

    say("building the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, config=config)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        tokenizer_model = header.metadata.get("tokenizer.ggml.model", "none")
        raise UserError(f"{gguf_file}: transformers {transformers.__version__} cannot build its tokenizer "
                        f"(tokenizer.ggml.model {tokenizer_model!r}: {_one_line(err)})") from None

    say(f"dequantizing the weights to {dtype}")
    torch_dtype = getattr(torch, dtype)
    # dequantize=True: a dense model whatever the architecture (some can otherwise stay in packed GGUF blocks)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch_dtype,
                                                  quantization_config=GgufConfig(dequantize=True))
    config.dtype = torch_dtype
    # the class's own from_pretrained, given the tensors: a model with no GGUF quantizer attached, so it saves
    model = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=torch_dtype)

    eos_ids = ordered_unique_ids(header.eos_token_ids(), config.eos_token_id,
                                 loaded.generation_config.eos_token_id, tokenizer.eos_token_id)
    vocab = max(len(tokenizer), config.get_text_config().vocab_size)
    outside = [token_id for token_id in eos_ids if not 0 <= token_id < vocab]
    if outside:
        say(f"ignoring end-of-sequence ids {outside}: outside the vocabulary of {vocab}")
        eos_ids = [token_id for token_id in eos_ids if token_id not in outside]
    generation_config = loaded.generation_config
    generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config
    del loaded

    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
    say(f"writing {output_dir}")
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return GGUFConversion(
        output_dir=output_dir,
        architecture=architecture,
        model_class=type(model).__name__,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        dtype=dtype,
        tied_embeddings=tied,
        eos_token_ids=eos_ids,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
