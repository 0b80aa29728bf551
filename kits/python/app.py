"""An embedhost plugin in Python: a component of the `model-plugin` world.

The host runs its BERT engine (the model its config names; by default
all-MiniLM-L6-v2, 384 dimensions) beside this plugin, in the same sandbox,
and this plugin asks it for vectors through the `encoder` import. What the
plugin adds, set by `[plugin.config]` (every value a string):

- `dimensions = "N"`: keep the first N numbers of each vector and scale it
  back to unit length (Matryoshka truncation; a model trained for it keeps
  most of its quality, another loses some).
- `strip_markup = "true"`: remove HTML tags, Markdown heading marks and
  emphasis marks before encoding.
- `lowercase = "true"`: lowercase every text before encoding.

Another key is refused naming it, except those the host passes a plugin
given a model (`model_id`, `pooling`, `normalize`): the encoder already
follows them, and they are accepted so that one table serves both.
The Rust and JavaScript kits do exactly the same.

Errors are values: raise `Err(EmbedError_...)`. Any other exception is a
trap, and the host replaces the instance.
"""

from wit_world import exports
from wit_world.imports import encoder, host_log
from wit_world.imports.types import (
    EmbedError_InvalidConfig,
    EmbedError_InvalidInput,
    EmbedError_NotInitialized,
    Embeddings,
    HealthReport,
    InputKind,
    InvalidInput,
    ModelInfo,
)
from componentize_py_types import Err

# Keys the host passes a plugin given a model: the encoder follows them.
HOST_KEYS = ("model_id", "pooling", "normalize")
KEYS = ("dimensions", "strip_markup", "lowercase")

# ASCII whitespace and punctuation: what ends a word for emphasis marks.
BOUNDARY = set(" \t\n\r\f\v!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

_state = None
_processed = 0


class Settings:
    def __init__(self, dimensions, strip_markup, lowercase):
        self.dimensions = dimensions
        self.strip_markup = strip_markup
        self.lowercase = lowercase


def parse_bool(key, value):
    if value in ("true", "false"):
        return value == "true"
    raise Err(EmbedError_InvalidConfig(f"`{key} = {value}`: expected true or false"))


def parse_config(config, encoder_dimension):
    dimensions, strip, lower = encoder_dimension, False, False
    for key, value in config:
        if key == "dimensions":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= encoder_dimension:
                raise Err(EmbedError_InvalidConfig(
                    f"`dimensions = {value}`: expected a whole number from 1 to {encoder_dimension}"
                    " (the encoder's dimension)"))
            dimensions = int(value)
        elif key == "strip_markup":
            strip = parse_bool(key, value)
        elif key == "lowercase":
            lower = parse_bool(key, value)
        elif key not in HOST_KEYS:
            raise Err(EmbedError_InvalidConfig(
                f"unknown key `{key}` (known: {', '.join(KEYS)})"))
    return Settings(dimensions, strip, lower)


def model_id(base, settings, encoder_dimension):
    """The encoder's model id, with a mark for each setting that changes
    the vectors: an index made with one is refused by another."""
    out = base
    if settings.dimensions < encoder_dimension:
        out += f"+d{settings.dimensions}"
    if settings.strip_markup:
        out += "+strip"
    if settings.lowercase:
        out += "+lower"
    return out


def strip_tags(text):
    """`<` then a letter, `/` or `!`, up to the next `>` with no `<` inside."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "<" and i + 1 < n and (text[i + 1].isascii() and text[i + 1].isalpha() or text[i + 1] in "/!"):
            end = i + 1
            while end < n and text[end] not in "<>":
                end += 1
            if end < n and text[end] == ">":
                i = end + 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def strip_headings(text):
    """One to six `#` at the start of a line, and the spaces or tabs after."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        hashes = len(line) - len(line.lstrip("#"))
        rest = line[hashes:]
        if 1 <= hashes <= 6 and rest[:1] in (" ", "\t"):
            lines[k] = rest.lstrip(" \t")
    return "\n".join(lines)


def strip_emphasis(text):
    """A run of `*` and `_` is dropped unless a word character stands on
    both sides of it (`snake_case` and `2*3` stay)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] in "*_":
            end = i
            while end < n and text[end] in "*_":
                end += 1
            before = text[i - 1] if i > 0 else " "
            after = text[end] if end < n else " "
            if before not in BOUNDARY and after not in BOUNDARY:
                out.append(text[i:end])
            i = end
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def prepare(text, settings):
    if settings.strip_markup:
        text = strip_emphasis(strip_headings(strip_tags(text)))
    if settings.lowercase:
        text = text.lower()
    return text


def cut(data, width, keep):
    """Each row of `width` floats cut to its first `keep`, at unit length."""
    out = []
    for start in range(0, len(data), width):
        row = data[start:start + keep]
        norm = sum(x * x for x in row) ** 0.5
        if norm > 0:
            row = [x / norm for x in row]
        out.extend(row)
    return out


class Embedder(exports.Embedder):
    def init(self, config):
        global _state
        info = encoder.info()
        settings = parse_config(config, info.dimension)
        _state = (settings, info)
        host_log.log(host_log.Level.DEBUG, f"python kit: {settings.dimensions} dimensions")
        return ModelInfo(
            model_id=model_id(info.model_id, settings, info.dimension),
            dimension=settings.dimensions,
            max_input_tokens=info.max_input_tokens,
            normalized=True,
        )

    def embed(self, texts, kind):
        # `kind` is not used: the host puts a model's query or document
        # prompt before each text itself.
        global _processed
        if _state is None:
            raise Err(EmbedError_NotInitialized())
        settings, info = _state
        prepared = [prepare(t, settings) for t in texts]
        data = []
        step = max(1, info.max_batch)
        for start in range(0, len(prepared), step):
            try:
                got = encoder.encode(prepared[start:start + step])
            except Err as e:
                # The encoder's error, unchanged, its index in this batch.
                if isinstance(e.value, EmbedError_InvalidInput) and start:
                    bad = e.value.value
                    raise Err(EmbedError_InvalidInput(InvalidInput(bad.index + start, bad.reason)))
                raise
            data.extend(cut(got.data, got.dimension, settings.dimensions))
        _processed += len(texts)
        return Embeddings(dimension=settings.dimensions, data=data)

    def health(self):
        # Python cannot read its linear memory cheaply: 0, and the host
        # measures it anyway.
        return HealthReport(memory_bytes=0, processed=_processed)
