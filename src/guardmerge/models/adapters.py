"""Architecture adapters: which tensors are encoder, which are head, and how names map.

Checkpoints name the same tensor differently: a headless ``BertModel`` stores
``encoder.layer.0...``, a ``BertForSequenceClassification`` stores ``bert.encoder.layer.0...``.
guardmerge works on **canonical names**: encoder tensors without the architecture prefix, head
tensors as the classifier stores them (``classifier.weight``). One small adapter per model
family says all of this (names, the classification head's layout and pooling, the stock classes,
where the blocks are, what sharing depths it supports); nothing outside this module branches on
``model_type``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from guardmerge.errors import CompatibilityError
from guardmerge.models.head_kinds import DEFAULT_KIND, head_kind, stock_kind
from guardmerge.models.roles import Role

log = logging.getLogger(__name__)

HEAD_INPUTS = ("pooled", "cls", "mean", "tokens")
"""What a head can read: the encoder's pooler output, the first token, the masked mean, or every
token's last hidden state (token-classification heads: ``[B, T, d]`` in, ``[B, T, C]`` out)."""


@dataclass(frozen=True)
class HeadLayout:
    """How one classification head is built, as its family's stock classifier builds it.

    Attributes:
        layers: the head's Linear layers in order, canonical names without ``.weight``.
        activation: the activation after every layer but the last (a ``transformers``
            ``ACT2FN`` name: ``tanh``, ``relu``, ``gelu``...).
        input: ``pooled`` (the encoder's pooler output), ``cls`` (the first token's hidden
            state), ``mean`` (the mean of the non-padding tokens' hidden states) or ``tokens``
            (every token's hidden state: a token-classification head).
        norms: LayerNorms, canonical names: ``norms[i]`` follows hidden layer ``i``'s activation
            (ModernBERT's ``head.norm``); fewer entries than hidden layers: the rest have none.
        norm_eps: the LayerNorms' epsilon.
        no_bias: layers and norms without a bias tensor.
    """

    layers: tuple[str, ...]
    activation: str
    input: str
    norms: tuple[str, ...] = ()
    norm_eps: float = 1e-5
    no_bias: tuple[str, ...] = ()

    def tensor_names(self) -> list[str]:
        """The head's canonical tensor names: layer by layer, each followed by its norm."""
        out: list[str] = []
        for i, layer in enumerate(self.layers):
            for module in (layer, self.norms[i]) if i < len(self.norms) else (layer,):
                out.append(f"{module}.weight")
                if module not in self.no_bias:
                    out.append(f"{module}.bias")
        return out


@dataclass(frozen=True)
class ArchitectureAdapter:
    """What guardmerge needs to know about one model family.

    Attributes:
        model_type: ``config.model_type`` (``bert``, ``roberta``, ``deberta-v2``...).
        prefix: the base-model attribute in ``*ForSequenceClassification`` (``bert``).
        head_prefixes: canonical prefixes of the classification head's tensors.
        ignore_prefixes: tensors of other heads (masked-LM...) that are neither merged nor kept.
        head_layers: the head's Linear layers in order, canonical names without ``.weight``;
            every layer but the last is followed by ``head_activation``.
        head_activation: activation between head layers (``tanh``, ``relu``, ``gelu``).
        head_input: what feeds the head: ``pooled`` (the encoder's pooler output), ``cls``
            (the first token's hidden state) or ``mean`` (masked mean over tokens).
        has_pooler: whether the encoder carries a pooler (``pooler.dense``).
        classifier_class: the stock sequence classifier (``BertForSequenceClassification``).
        token_classifier_class: the stock token classifier, or None.
        token_head_layers: the token classifier's Linear layers in order (``classifier`` on the
            token states after dropout, for most families; ModernBERT's ``head.dense`` first).
        token_head_norms: LayerNorms inside the token head (ModernBERT's ``head.norm``).
        multi_head: whether the family can be a multi-head model (``heads: multi | hm3``);
            decoder families (Llama) merge whole checkpoints with ``heads: shared`` only.
        pooler_flag: the base-model constructor argument that adds or drops its pooler
            (``add_pooling_layer``), or None where the base model takes none.
        pooler_head_layers: the pooler's Linear layers, canonical (``pooler.dense``); a head
            owns them (before its own layers, reading the first token) when the base has no
            pooler, so each head keeps the pooler its expert trained.
        head_norms: LayerNorms inside the head (see :attr:`HeadLayout.norms`).
        head_activation_key: config field naming the head's activation (overrides
            ``head_activation``), or None.
        head_input_key: config field choosing ``cls`` or ``mean`` pooling, or None.
        head_norm_eps_key: config field holding the head LayerNorms' epsilon, or None.
        head_bias_keys: ``(layer, config field)``: a head layer whose bias exists only when the
            config field is true (ModernBERT's ``classifier_bias``).
        head_norm_bias_key: config field telling whether the head's LayerNorms have a bias.
        blocks: the encoder's list of transformer blocks, as an attribute path of the base
            model (``encoder.layer``); None where share_layers and the layer-wise stage are not
            supported (``no_blocks_reason`` says why).
        no_blocks_reason: why the family has no block list guardmerge can use.
        block_output_tuple: the family's encoder loop expects a tuple from each block
            (``(hidden, attentions)``) rather than the hidden states alone.
        sharing_conflicts: config fields that, when set (non-zero), rule out a sharing depth
            and the layer-wise stage (a DeBERTa conv layer runs between blocks 0 and 1, outside
            the block list).
        no_layerwise_reason: why the layer-wise stage cannot solve this family's blocks although
            it has a block list (empty: it can).
        pooler: the base model's pooler module (``pooler``: it reads the last hidden states),
            or None.
        embeddings: the base model's embeddings module (``embeddings``), or None.
        embeddings_project: a Linear the base model applies to the embeddings output before
            the first block when the embedding size differs from the hidden size (ELECTRA's
            ``embeddings_project``), or None.
        block_output_norm: the LayerNorm inside a block that produces the block's output
            (``output.LayerNorm``), or None where the block's output is not a LayerNorm's; a
            per-feature affine map on a block's output folds into it (sharing depth export).
        embeddings_norm: the LayerNorm producing the embeddings output (``embeddings.LayerNorm``).
        additive_mask: the base model reads a prepared 4D additive attention mask exactly as its
            0/1 mask (what per-example Fisher statistics pass it); False where it builds more
            from the 0/1 mask (DeBERTa's embeddings, ModernBERT's sliding windows).
        position_offset: positions start after the padding index (RoBERTa-style: 514 position
            embeddings for 512 tokens).
        embedding_names: canonical prefixes of embedding tables not named ``embeddings``
            (MPNet's ``encoder.relative_attention_bias``).
        linear_names: canonical prefixes of Linear layers whose names mention ``embeddings``
            (ELECTRA's ``embeddings_project``).
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
    classifier_class: str = ""
    token_classifier_class: str | None = None
    token_head_layers: tuple[str, ...] = ("classifier",)
    token_head_norms: tuple[str, ...] = ()
    multi_head: bool = True
    pooler_flag: str | None = None
    pooler_head_layers: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    head_activation_key: str | None = None
    head_input_key: str | None = None
    head_norm_eps_key: str | None = None
    head_bias_keys: tuple[tuple[str, str], ...] = ()
    head_norm_bias_key: str | None = None
    blocks: str | None = None
    no_blocks_reason: str = ""
    block_output_tuple: bool = False
    sharing_conflicts: tuple[str, ...] = ()
    no_layerwise_reason: str = ""
    pooler: str | None = None
    embeddings: str | None = None
    embeddings_project: str | None = None
    block_output_norm: str | None = None
    embeddings_norm: str | None = None
    additive_mask: bool = True
    position_offset: bool = False
    embedding_names: tuple[str, ...] = ()
    linear_names: tuple[str, ...] = ()

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
        if canonical.startswith(self.linear_names):
            return Role.BIAS if leaf[-1] == "bias" else Role.LINEAR_WEIGHT
        if canonical.startswith(self.embedding_names) or (
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

    # -- the classification head -------------------------------------------------------------
    def head_layout(
        self, config: Mapping[str, Any], pooler_in_head: bool = False, where: str = "", problem: str = DEFAULT_KIND
    ) -> HeadLayout:
        """The head a stock classifier of this family builds for ``config`` (a ``config.json``
        dict): its layers, activation, pooling, norms and bias-less layers.

        Args:
            pooler_in_head: the head owns the pooler (``pooler_head_layers`` first, reading the
                first token): the base checkpoint has no pooler. Ignored for token heads, which
                read the token states and never the pooler.
            where: names the checkpoint in errors.
            problem: the head kind: a per-token kind (``token``) gives the stock token
                classifier's head (reading ``tokens``); sequence heads (single- and multi-label)
                are built alike.

        Raises:
            CompatibilityError: a config field the layout reads has an unsupported value.
        """
        at = f"{where}: " if where else ""
        activation = self.head_activation
        if self.head_activation_key and config.get(self.head_activation_key) is not None:
            activation = str(config[self.head_activation_key])
        eps = 1e-5
        if self.head_norm_eps_key and config.get(self.head_norm_eps_key) is not None:
            eps = float(config[self.head_norm_eps_key])
        token = head_kind(problem).per_token
        layers, norms = self.head_layers, self.head_norms
        if token:
            layers, norms = self.token_head_layers, self.token_head_norms
        no_bias = [layer for layer, key in self.head_bias_keys if layer in layers and not config.get(key)]
        if self.head_norm_bias_key and not config.get(self.head_norm_bias_key):
            no_bias += list(norms)
        if token:
            return HeadLayout(tuple(layers), activation, "tokens", tuple(norms), eps, tuple(no_bias))
        head_input = self.head_input
        if self.head_input_key and config.get(self.head_input_key) is not None:
            head_input = str(config[self.head_input_key])
            if head_input not in ("cls", "mean"):
                raise CompatibilityError(
                    f"{at}config field '{self.head_input_key}' is '{head_input}'; guardmerge supports 'cls' and 'mean'"
                )
        if pooler_in_head:
            if not self.pooler_head_layers:
                raise CompatibilityError(f"{at}{self.model_type} has no pooler a head could own")
            if norms:
                raise CompatibilityError(f"{at}{self.model_type}: a head with norms cannot also own the pooler")
            layers = (*self.pooler_head_layers, *layers)
            head_input = "cls"
        return HeadLayout(tuple(layers), activation, head_input, tuple(norms), eps, tuple(no_bias))

    def head_config(self, layout: HeadLayout, linears_with_bias: Iterable[str] = ()) -> dict[str, Any]:
        """The config fields a stock classifier needs to rebuild ``layout`` (inverse of
        :meth:`head_layout`): its activation, pooling and bias flags.

        Args:
            linears_with_bias: head layers that now carry a bias (a refit may add one).
        """
        out: dict[str, Any] = {}
        if self.head_activation_key:
            out[self.head_activation_key] = layout.activation
        if self.head_input_key and layout.input in ("cls", "mean"):
            out[self.head_input_key] = layout.input
        biased = set(linears_with_bias)
        for layer, key in self.head_bias_keys:
            if layer in biased:
                out[key] = True
        return out

    def problem(self, config: Mapping[str, Any]) -> str:
        """The head kind of a stock checkpoint with ``config``: ``token`` for the family's token
        classifier (``architectures``), ``multi_label`` for ``problem_type:
        multi_label_classification``, else ``single_label``."""
        arch = config.get("architectures") or []
        token = bool(self.token_classifier_class) and isinstance(arch, list) and self.token_classifier_class in arch
        return stock_kind(token, config.get("problem_type")).name

    def stock_class(self, problem: str) -> str:
        """The stock transformers class a head of kind ``problem`` exports to."""
        if head_kind(problem).per_token:
            if not self.token_classifier_class:
                raise CompatibilityError(f"{self.model_type} has no stock token classifier")
            return self.token_classifier_class
        return self.classifier_class

    @property
    def classifier_weight(self) -> str:
        """The canonical name of the head's last (label-producing) weight."""
        return f"{self.head_layers[-1]}.weight"

    def label_weight(self, problem: str) -> str:
        """The canonical name of the label-producing weight of a head of kind ``problem``."""
        return f"{self.token_head_layers[-1]}.weight" if head_kind(problem).per_token else self.classifier_weight

    def encoder_kwargs(self, with_pooler: bool) -> dict[str, Any]:
        """Keyword arguments of the base model's constructor (``add_pooling_layer``)."""
        return {self.pooler_flag: with_pooler} if self.pooler_flag else {}

    # -- blocks and sharing depths -------------------------------------------------------------
    def sharing_problem(self, config: Mapping[str, Any] | None = None) -> str | None:
        """Why this family (with ``config``) cannot branch at a sharing depth, or None if it can."""
        if self.blocks is None:
            reason = self.no_blocks_reason or "it has no block list"
            return f"{self.model_type} models do not support share_layers: {reason}"
        for key in self.sharing_conflicts:
            value = (config or {}).get(key)
            if value:
                return f"{self.model_type} models with config field '{key}' = {value!r} do not support share_layers"
        return None

    def layerwise_problem(self, config: Mapping[str, Any] | None = None) -> str | None:
        """Why the layer-wise stage cannot run on this family (with ``config``), or None if it can."""
        if self.blocks is None:
            reason = self.no_blocks_reason or "it has no block list"
        elif self.no_layerwise_reason:
            reason = self.no_layerwise_reason
        else:
            conflicts = [k for k in self.sharing_conflicts if (config or {}).get(k)]
            if not conflicts:
                return None
            reason = f"config field '{conflicts[0]}' is set"
        return f"the layer-wise stage does not support {self.model_type} models: {reason}"

    def branch_prefixes(self, share_layers: int, layers: int) -> tuple[str, ...]:
        """Canonical-name prefixes a task's branch owns at sharing depth ``share_layers`` of
        ``layers`` blocks: blocks ``>= K``, the pooler, and at ``K = 0`` the embeddings (and
        their projection) so the branch reproduces its expert. Empty when ``K >= layers``."""
        if self.blocks is None or share_layers >= layers:
            return ()
        owned = [f"{self.blocks}.{k}." for k in range(share_layers, layers)]
        if self.pooler:
            owned.append(self.pooler + ".")
        if share_layers == 0:
            owned += [f"{m}." for m in (self.embeddings, self.embeddings_project) if m]
        return tuple(owned)

    def num_blocks(self, names: Iterable[str]) -> int:
        """The number of transformer blocks ``L`` among canonical ``names`` (0 without any)."""
        if self.blocks is None:
            return 0
        lead = self.blocks + "."
        found = {int(n[len(lead) :].split(".", 1)[0]) for n in names if n.startswith(lead)}
        return max(found) + 1 if found else 0


_BERT_LIKE_BLOCKS: dict[str, Any] = {
    "blocks": "encoder.layer",
    "embeddings": "embeddings",
    "block_output_norm": "output.LayerNorm",
    "embeddings_norm": "embeddings.LayerNorm",
}

_ROBERTA_HEAD: dict[str, Any] = {
    "head_prefixes": ("classifier.",),
    "head_layers": ("classifier.dense", "classifier.out_proj"),
    "head_activation": "tanh",
    "head_input": "cls",
    "has_pooler": False,
}

_ROBERTA = ArchitectureAdapter(
    model_type="roberta",
    prefix="roberta",
    ignore_prefixes=("lm_head.", "pooler."),
    classifier_class="RobertaForSequenceClassification",
    token_classifier_class="RobertaForTokenClassification",
    pooler_flag="add_pooling_layer",
    position_offset=True,
    **_ROBERTA_HEAD,
    **_BERT_LIKE_BLOCKS,
)

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
            classifier_class="BertForSequenceClassification",
            token_classifier_class="BertForTokenClassification",
            pooler_flag="add_pooling_layer",
            pooler_head_layers=("pooler.dense",),
            pooler="pooler",
            **_BERT_LIKE_BLOCKS,
        ),
        _ROBERTA,
        replace(  # XLM-R: RoBERTa's layout under other class names
            _ROBERTA,
            model_type="xlm-roberta",
            classifier_class="XLMRobertaForSequenceClassification",
            token_classifier_class="XLMRobertaForTokenClassification",
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
            classifier_class="DistilBertForSequenceClassification",
            token_classifier_class="DistilBertForTokenClassification",
            blocks="transformer.layer",
            embeddings="embeddings",
            block_output_norm="output_layer_norm",
            embeddings_norm="embeddings.LayerNorm",
        ),
        ArchitectureAdapter(  # DeBERTa-v3, mDeBERTa: the ContextPooler belongs with the head
            model_type="deberta-v2",
            prefix="deberta",
            head_prefixes=("pooler.", "classifier."),
            ignore_prefixes=("lm_predictions.", "cls.", "mask_predictions."),
            head_layers=("pooler.dense", "classifier"),
            head_activation="gelu",
            head_activation_key="pooler_hidden_act",
            head_input="cls",
            has_pooler=False,
            classifier_class="DebertaV2ForSequenceClassification",
            token_classifier_class="DebertaV2ForTokenClassification",
            block_output_tuple=True,
            additive_mask=False,
            sharing_conflicts=("conv_kernel_size",),
            no_layerwise_reason=(
                "its disentangled attention also runs its projections on the relative position "
                "embeddings, not only on the tokens"
            ),
            linear_names=("embeddings.embed_proj.",),
            **_BERT_LIKE_BLOCKS,
        ),
        ArchitectureAdapter(
            model_type="modernbert",
            prefix="model",
            head_prefixes=("head.", "classifier."),
            ignore_prefixes=("decoder.",),
            head_layers=("head.dense", "classifier"),
            head_activation="gelu",
            head_activation_key="classifier_activation",
            head_input="cls",
            head_input_key="classifier_pooling",
            head_norms=("head.norm",),
            head_norm_eps_key="norm_eps",
            head_bias_keys=(("head.dense", "classifier_bias"),),
            head_norm_bias_key="norm_bias",
            has_pooler=False,
            classifier_class="ModernBertForSequenceClassification",
            token_classifier_class="ModernBertForTokenClassification",
            token_head_layers=("head.dense", "classifier"),
            token_head_norms=("head.norm",),
            no_blocks_reason=(
                "its layers alternate global and sliding-window attention (each block takes its own "
                "mask and rotary embeddings) and a final norm follows the last block"
            ),
            embeddings="embeddings",
            embeddings_norm="embeddings.norm",
            additive_mask=False,
        ),
        ArchitectureAdapter(
            model_type="electra",
            prefix="electra",
            head_prefixes=("classifier.",),
            ignore_prefixes=("discriminator_predictions.", "generator_predictions.", "generator_lm_head."),
            head_layers=("classifier.dense", "classifier.out_proj"),
            head_activation="gelu",
            head_input="cls",
            has_pooler=False,
            classifier_class="ElectraForSequenceClassification",
            token_classifier_class="ElectraForTokenClassification",
            embeddings_project="embeddings_project",
            linear_names=("embeddings_project.",),
            **_BERT_LIKE_BLOCKS,
        ),
        ArchitectureAdapter(
            model_type="mpnet",
            prefix="mpnet",
            ignore_prefixes=("lm_head.", "pooler."),
            classifier_class="MPNetForSequenceClassification",
            token_classifier_class="MPNetForTokenClassification",
            pooler_flag="add_pooling_layer",
            position_offset=True,
            block_output_tuple=True,
            embedding_names=("encoder.relative_attention_bias.",),
            **_ROBERTA_HEAD,
            **_BERT_LIKE_BLOCKS,
        ),
        ArchitectureAdapter(
            model_type="albert",
            prefix="albert",
            head_prefixes=("classifier.",),
            ignore_prefixes=("predictions.", "sop_classifier."),
            head_layers=("classifier",),
            head_activation="tanh",
            head_input="pooled",
            has_pooler=True,
            classifier_class="AlbertForSequenceClassification",
            token_classifier_class="AlbertForTokenClassification",
            pooler_flag="add_pooling_layer",
            pooler_head_layers=("pooler",),
            no_blocks_reason="its layers share one set of weights (there is no per-layer block list)",
            embeddings="embeddings",
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
            classifier_class="LlamaForSequenceClassification",
            token_classifier_class="LlamaForTokenClassification",
            multi_head=False,
            no_blocks_reason="decoder models merge whole checkpoints (heads: shared)",
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


def position_offset(config: Mapping[str, Any]) -> bool:
    """Whether ``config``'s family offsets positions by the padding index (RoBERTa-style)."""
    adapter = ADAPTERS.get(str(config.get("model_type", "")))
    return adapter is not None and adapter.position_offset


def encoder_names(adapter: ArchitectureAdapter, names: Iterable[str]) -> list[str]:
    """Canonical encoder tensor names among ``names`` (heads and ignored tensors removed)."""
    out = []
    for name in names:
        c = adapter.canonical(name)
        if not adapter.is_head(c) and not adapter.is_ignored(c):
            out.append(c)
    return out


def position_limit(config: Any) -> int | None:
    """The most tokens per text ``config`` (a ``config.json`` dict) can embed, or None if unknown.

    RoBERTa-style models offset positions by ``pad_token_id + 1`` (514 positions: 512 tokens).
    """
    n = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if position_offset(config):
        pad = config.get("pad_token_id")
        n -= (pad if isinstance(pad, int) else 1) + 1
    return max(n, 1)


def capped_length(max_length: int, config: Any, what: str, *, level: int = logging.INFO) -> int:
    """``max_length`` capped at the model's positions (:func:`position_limit`), logged when capped."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        log.log(level, "%s: max_length %d capped at %d (the model's max_position_embeddings)", what, max_length, limit)
        return limit
    return max_length
