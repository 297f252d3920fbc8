"""Architecture adapters: which tensors are encoder, which are head, and how names map.

Checkpoints name the same tensor differently: a headless ``BertModel`` stores
``encoder.layer.0...``, a ``BertForSequenceClassification`` stores ``bert.encoder.layer.0...``.
guardmerge works on **canonical names**: encoder tensors without the architecture prefix, head
tensors as the classifier stores them (``classifier.weight``). One small adapter per model
family says all of this; there is no class per model family anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from guardmerge.errors import CompatibilityError
from guardmerge.methods.registry import Role


@dataclass(frozen=True)
class ArchitectureAdapter:
    """What guardmerge needs to know about one model family.

    Attributes:
        model_type: ``config.model_type`` (``bert``, ``roberta``, ``distilbert``...).
        prefix: the base-model attribute in ``*ForSequenceClassification`` (``bert``).
        head_prefixes: canonical prefixes of the classification head's tensors.
        ignore_prefixes: tensors of other heads (masked-LM...) that are neither merged nor kept.
        head_layers: the head's Linear layers in order, canonical names without ``.weight``;
            every layer but the last is followed by ``head_activation``.
        head_activation: activation between head layers (``tanh``, ``relu``).
        head_input: what feeds the head: ``pooled`` (the encoder's pooler output) or ``cls``
            (the first token's hidden state).
        has_pooler: whether the encoder carries a pooler (``pooler.dense``).
        multi_head: whether the family can be a multi-head model (``heads: multi | hm3``);
            decoder families (Llama) merge whole checkpoints with ``heads: shared`` only.
        blocks: the encoder's list of transformer blocks, as an attribute path of the base
            model (``encoder.layer``); None where the layer-wise stage is not supported.
        pooler: the base model's pooler module (``pooler``: it reads the last hidden states),
            or None.
        embeddings: the base model's embeddings module (``embeddings``), or None.
        block_output_norm: the LayerNorm inside a block that produces the block's output
            (``output.LayerNorm``), or None where the block's output is not a LayerNorm's; a
            per-feature affine map on a block's output folds into it (sharing depth export).
        embeddings_norm: the LayerNorm producing the embeddings output (``embeddings.LayerNorm``).
        hidden_in_head: the head has a hidden layer (so ``hm3`` head mode is refused).
    """

    model_type: str
    prefix: str
    head_prefixes: tuple[str, ...]
    ignore_prefixes: tuple[str, ...]
    head_layers: tuple[str, ...]
    head_activation: str
    head_input: str
    has_pooler: bool
    multi_head: bool = True
    blocks: str | None = None
    pooler: str | None = None
    embeddings: str | None = None
    block_output_norm: str | None = None
    embeddings_norm: str | None = None

    @property
    def hidden_in_head(self) -> bool:
        return len(self.head_layers) > 1

    def canonical(self, name: str) -> str:
        """Strip the architecture prefix: ``bert.encoder.x`` -> ``encoder.x``."""
        lead = self.prefix + "."
        return name[len(lead) :] if name.startswith(lead) else name

    def prefixed(self, canonical: str) -> str:
        """The name a ``*ForSequenceClassification`` checkpoint uses for a canonical name."""
        return canonical if self.is_head(canonical) else f"{self.prefix}.{canonical}"

    def is_head(self, canonical: str) -> bool:
        return canonical.startswith(self.head_prefixes)

    def is_ignored(self, canonical: str) -> bool:
        return canonical.startswith(self.ignore_prefixes)

    def is_pooler(self, canonical: str) -> bool:
        return self.has_pooler and canonical.startswith("pooler.")

    def role(self, canonical: str, ndim: int) -> Role:
        """Classify a canonical tensor name (``ndim`` disambiguates weights from biases)."""
        if self.is_head(canonical):
            return Role.HEAD
        leaf = canonical.rsplit(".", 2)
        low = canonical.lower()
        if (
            ("embeddings" in low or "embed_tokens" in low)
            and ndim == 2
            and "layernorm" not in low
            and "layer_norm" not in low
        ):
            return Role.EMBEDDING
        if "layernorm" in low or "layer_norm" in low or low.endswith(("ln.weight", "ln.bias", "norm.weight")):
            return Role.NORM
        if leaf[-1] == "bias":
            return Role.BIAS
        if leaf[-1] == "weight" and ndim == 2:
            return Role.LINEAR_WEIGHT
        return Role.OTHER

    def branch_prefixes(self, share_layers: int, layers: int) -> tuple[str, ...]:
        """Canonical-name prefixes a task's branch owns at sharing depth ``share_layers`` of
        ``layers`` blocks: blocks ``>= K``, the pooler, and at ``K = 0`` the embeddings (so the
        branch reproduces its expert). Empty when ``K >= layers`` (every layer shared)."""
        if self.blocks is None or share_layers >= layers:
            return ()
        owned = [f"{self.blocks}.{k}." for k in range(share_layers, layers)]
        if self.pooler:
            owned.append(self.pooler + ".")
        if share_layers == 0 and self.embeddings:
            owned.append(self.embeddings + ".")
        return tuple(owned)

    def num_blocks(self, names: Iterable[str]) -> int:
        """The number of transformer blocks ``L`` among canonical ``names`` (0 without any)."""
        if self.blocks is None:
            return 0
        lead = self.blocks + "."
        found = {int(n[len(lead) :].split(".", 1)[0]) for n in names if n.startswith(lead)}
        return max(found) + 1 if found else 0

    def head_names(self) -> list[str]:
        """The head's canonical tensor names, in layer order."""
        return [f"{layer}.{kind}" for layer in self.head_layers for kind in ("weight", "bias")]


ADAPTERS: dict[str, ArchitectureAdapter] = {
    a.model_type: a
    for a in (
        ArchitectureAdapter(
            model_type="bert",
            prefix="bert",
            head_prefixes=("classifier.",),
            ignore_prefixes=("cls.",),
            head_layers=("classifier",),
            head_activation="tanh",
            head_input="pooled",
            has_pooler=True,
            blocks="encoder.layer",
            pooler="pooler",
            embeddings="embeddings",
            block_output_norm="output.LayerNorm",
            embeddings_norm="embeddings.LayerNorm",
        ),
        ArchitectureAdapter(
            model_type="roberta",
            prefix="roberta",
            head_prefixes=("classifier.",),
            ignore_prefixes=("lm_head.", "pooler."),
            head_layers=("classifier.dense", "classifier.out_proj"),
            head_activation="tanh",
            head_input="cls",
            has_pooler=False,
            blocks="encoder.layer",
            embeddings="embeddings",
            block_output_norm="output.LayerNorm",
            embeddings_norm="embeddings.LayerNorm",
        ),
        ArchitectureAdapter(
            model_type="distilbert",
            prefix="distilbert",
            head_prefixes=("pre_classifier.", "classifier."),
            ignore_prefixes=("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
            head_layers=("pre_classifier", "classifier"),
            head_activation="relu",
            head_input="cls",
            has_pooler=False,
            blocks="transformer.layer",
            embeddings="embeddings",
            block_output_norm="output_layer_norm",
            embeddings_norm="embeddings.LayerNorm",
        ),
        ArchitectureAdapter(  # LlamaForCausalLM / LlamaForSequenceClassification: heads: shared
            model_type="llama",
            prefix="model",
            head_prefixes=("lm_head.", "score."),
            ignore_prefixes=(),
            head_layers=("score",),
            head_activation="none",
            head_input="last",
            has_pooler=False,
            multi_head=False,
        ),
    )
}
"""Supported model families, by ``config.model_type``."""


def get_adapter(model_type: str, where: str = "") -> ArchitectureAdapter:
    """The adapter of ``model_type``, or a :class:`CompatibilityError` naming the checkpoint."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        at = f" ({where})" if where else ""
        raise CompatibilityError(
            f"unsupported model_type '{model_type}'{at}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def encoder_names(adapter: ArchitectureAdapter, names: Iterable[str]) -> list[str]:
    """Canonical encoder tensor names among ``names`` (heads and ignored tensors removed)."""
    out = []
    for name in names:
        c = adapter.canonical(name)
        if not adapter.is_head(c) and not adapter.is_ignored(c):
            out.append(c)
    return out
