"""A hostile Python plugin (tests/all/kits.rs): a component of the plain
`plugin` world whose `embed` allocates without bound when a text is
`attack`, and embeds anything else as a fixed unit vector."""

from wit_world import exports
from wit_world.imports.types import Embeddings, HealthReport, ModelInfo

DIMENSION = 8


class Embedder(exports.Embedder):
    def init(self, config):
        return ModelInfo(model_id="test/hostile-python", dimension=DIMENSION,
                         max_input_tokens=512, normalized=True)

    def embed(self, texts, kind):
        if "attack" in texts:
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        one = [1.0] + [0.0] * (DIMENSION - 1)
        return Embeddings(dimension=DIMENSION, data=one * len(texts))

    def health(self):
        return HealthReport(memory_bytes=0, processed=0)
