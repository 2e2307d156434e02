"""Benchmark model shapes (Llama layout, untied embeddings, no grouped-query attention)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped checkpoint family: one base plus ``num_experts`` fine-tuned experts."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    num_experts: int = 3
    dtype: str = "bfloat16"
    # one shard per GiB: the 150M shape stays in one file (as a real 150M HF checkpoint would),
    # the 1B shape gets several shards and an index
    shard_size_bytes: int = 1 << 30
    seed: int = 0

    @property
    def num_params(self) -> int:
        """Parameters of one model (every tensor in the state dict, norms included)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return 2 * v * h + self.num_layers * per_layer + h

    @property
    def bytes_per_model(self) -> int:
        return self.num_params * (4 if self.dtype == "float32" else 2)

    def describe(self) -> dict:
        d = asdict(self)
        d["num_params"] = self.num_params
        d["bytes_per_model"] = self.bytes_per_model
        return d


SHAPES: dict[str, Shape] = {
    # a few MB per model: for the quick pytest run and the harness's own tests
    "tiny": Shape("tiny", 256, 688, 4, 4096, shard_size_bytes=1 << 20),
    # 148.3M parameters per model (297 MB in bf16); 4 inputs = 1.19 GB read, 0.30 GB written
    "150m": Shape("150m", 768, 2560, 12, 32000),
    # TinyLlama-1.1B layout (without GQA): 1.26B parameters per model, 2.5 GB in bf16
    "1b": Shape("1b", 2048, 5632, 22, 32000),
}
