"""The merged artifact: one shared encoder, one classification head per task.

One encoder pass per batch, then every head; softmax per head (HM3, Hackmann 2024). The folder
format is plain: ``model.safetensors`` (encoder tensors under their canonical names, head
tensors under ``heads.<task>.<layer>.{weight,bias}``), ``config.json`` (the encoder's
transformers config plus a ``guardmerge`` section describing the heads), the tokenizer, the
merge config and a model card. Any single task exports back to a stock
``AutoModelForSequenceClassification`` folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardmerge.architectures import ArchitectureAdapter, get_adapter
from guardmerge.errors import CheckpointError, GuardmergeError
from guardmerge.io import atomic_dir

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
HEAD_PREFIX = "heads."


@dataclass(frozen=True)
class HeadSpec:
    """How one task's head is built.

    Attributes:
        labels: label names in logit order.
        layers: canonical layer names in order (``classifier``; ``classifier.dense``,
            ``classifier.out_proj``; ``pooler.dense``, ``classifier`` when the head owns a pooler).
        input: ``pooled`` (the encoder's shared pooler output) or ``cls`` (first token).
        activation: between layers (``tanh`` or ``relu``).
    """

    labels: tuple[str, ...]
    layers: tuple[str, ...]
    input: str
    activation: str

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSpec:
        return cls(
            labels=tuple(data["labels"]),
            layers=tuple(data["layers"]),
            input=str(data["input"]),
            activation=str(data["activation"]),
        )


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class Head(nn.Module):
    """A stack of Linear layers with an activation between them: ``[B, d] -> [B, C]``."""

    def __init__(self, spec: HeadSpec, shapes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in shapes)
        self.act = _ACTIVATIONS[spec.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i:
                x = self.act(x)
            x = layer(x)
        return x

    def state(self, task: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in zip(self.spec.layers, self.layers):
            out[f"{HEAD_PREFIX}{task}.{name}.weight"] = layer.weight.detach()
            out[f"{HEAD_PREFIX}{task}.{name}.bias"] = layer.bias.detach()
        return out


def build_encoder(config: Mapping[str, Any], with_pooler: bool) -> nn.Module:
    """A randomly initialised transformers base model (``BertModel``...) for ``config``."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "guardmerge"})
    kwargs = {"add_pooling_layer": with_pooler} if cfg.model_type in ("bert", "roberta") else {}
    return AutoModel.from_config(cfg, **kwargs)


class MultiHeadModel(nn.Module):
    """A shared encoder with one head per task.

    Args:
        encoder: a transformers base model (``BertModel``, ``RobertaModel``, ``DistilBertModel``).
        heads: task -> :class:`Head`.
        config: the encoder's config dict (``config.json`` minus the ``guardmerge`` section).
        info: provenance (base, experts, method, parameters, version) for the model card.
        tokenizer: a transformers tokenizer, needed by :meth:`predict`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.config = dict(config)
        self.info = dict(info or {})
        self.tokenizer = tokenizer
        self.adapter: ArchitectureAdapter = get_adapter(str(self.config["model_type"]))
        self.eval()

    # -- structure -----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        return list(self._head(task).spec.labels)

    def _head(self, task: str) -> Head:
        if task not in self.heads:
            raise GuardmergeError(f"unknown task '{task}'; this model has: {', '.join(self.tasks)}")
        return self.heads[task]  # type: ignore[return-value]

    # -- inference -----------------------------------------------------------------------
    def head_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the encoder once: ``{"pooled": [B, d], "cls": [B, d]}`` (what heads read)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = out[0]
        feats = {"cls": hidden[:, 0]}
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            feats["pooled"] = pooled
        return feats

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: Sequence[str] | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [B, C_task]}`` from one encoder pass."""
        feats = self.head_inputs(input_ids, attention_mask, **extra)
        chosen = list(tasks) if tasks is not None else self.tasks
        return {t: self._head(t)(feats[self._head(t).spec.input]) for t in chosen}

    def encode(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` with the model's tokenizer (padded batch tensors)."""
        if self.tokenizer is None:
            raise GuardmergeError("this model has no tokenizer; load it from a saved folder")
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=max_length or min(512, int(self.config.get("max_position_embeddings", 512))),
                return_tensors="pt",
            )
        )

    @torch.no_grad()
    def logits(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [len(texts), C_task]}``, input order kept."""
        chosen = list(tasks) if tasks is not None else self.tasks
        parts: dict[str, list[torch.Tensor]] = {t: [] for t in chosen}
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size], max_length)
            for task, out in self(tasks=chosen, **batch).items():
                parts[task].append(out.float())
        return {t: torch.cat(p) if p else torch.empty(0, len(self.labels(t))) for t, p in parts.items()}

    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Every head's verdict: ``{task: [{"label": str, "score": float}, ...]}`` in input order.

        ``score`` is the softmax probability (per head) of the predicted label.
        """
        if isinstance(texts, str):
            texts = [texts]
        out: dict[str, list[dict[str, Any]]] = {}
        for task, logit in self.logits(texts, batch_size=batch_size, max_length=max_length, tasks=tasks).items():
            probs = torch.softmax(logit, dim=-1)
            score, idx = probs.max(dim=-1)
            names = self.labels(task)
            out[task] = [
                {"label": names[i], "score": float(s)} for i, s in zip(idx.tolist(), score.tolist())
            ]
        return out

    # -- persistence ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as saved: canonical encoder names, then ``heads.<task>.<layer>.*``."""
        tensors = {k: v.detach() for k, v in self.encoder.state_dict().items()}
        for task in self.tasks:
            tensors.update(self._head(task).state(task))
        return tensors

    def save_pretrained(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the model folder atomically (temporary folder, then rename)."""
        with atomic_dir(path, force=force) as tmp:
            cfg = folder_config(self.config, {t: self._head(t).spec for t in self.tasks}, self.info)
            write_model_folder(tmp, self.state_tensors(), cfg, self.tokenizer)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> MultiHeadModel:
        """Load a folder written by :meth:`save_pretrained` or ``guardmerge merge``."""
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file} is missing: not a guardmerge model folder")
        config = json.loads(cfg_file.read_text())
        meta = config.pop("guardmerge", None)
        if not meta or "heads" not in meta:
            raise CheckpointError(
                f"{cfg_file} has no 'guardmerge.heads' section: this is not a merged multi-head "
                "model (a single classifier loads with transformers directly)"
            )
        from guardmerge.writer import read_tensors

        tensors = read_tensors(folder)  # one file or shards with an index
        heads: dict[str, Head] = {}
        for task, raw in meta["heads"].items():
            spec = HeadSpec.from_dict(raw)
            heads[task] = head_from_tensors(task, spec, tensors)
        with_pooler = any(k.startswith("pooler.") for k in tensors)
        encoder = build_encoder(config, with_pooler)
        enc_state = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
        buffers = ("position_ids", "token_type_ids")  # non-persistent in recent transformers
        missing = [m for m in missing if not m.endswith(buffers)]
        unexpected = [u for u in unexpected if not u.endswith(buffers)]
        if missing or unexpected:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE}: encoder tensors do not match the config "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
        tokenizer = load_tokenizer(folder)
        info = {k: v for k, v in meta.items() if k not in ("heads", "version")}
        model = cls(encoder, heads, config, info=info, tokenizer=tokenizer)
        return model.to(device)

    @classmethod
    def from_classifier(cls, path: str | Path, task: str | None = None, *, allow_pickle: bool = False) -> MultiHeadModel:
        """Wrap a stock ``*ForSequenceClassification`` folder (or hub id) as a one-head model."""
        from guardmerge.architectures import encoder_names
        from guardmerge.checkpoint import Checkpoint

        with Checkpoint(path, allow_pickle=allow_pickle) as ck:
            ad = ck.adapter
            names = encoder_names(ad, ck.names())
            enc_state = {n: ck.get(n) for n in names}
            name = task or Path(ck.source).name
            spec = HeadSpec(tuple(ck.id2label()), ad.head_layers, ad.head_input, ad.head_activation)
            missing = [n for n in ad.head_names() if n not in ck]
            if missing:
                raise CheckpointError(f"{ck.source} has no classification head ('{missing[0]}' missing)")
            head = head_from_tensors(name, spec, {f"{HEAD_PREFIX}{name}.{n}": ck.get(n) for n in ad.head_names()})
            config = {k: v for k, v in ck.config.items() if k not in ("id2label", "label2id", "architectures")}
            encoder = build_encoder(config, any(n.startswith("pooler.") for n in enc_state))
            encoder.load_state_dict(enc_state, strict=False)
            return cls(encoder, {name: head}, config, info={"source": ck.source}, tokenizer=load_tokenizer(ck.path))

    # -- single-task export ----------------------------------------------------------------
    def export_task(self, task: str, path: str | Path, *, force: bool = False) -> Path:
        """Write ``task`` as a stock ``AutoModelForSequenceClassification`` folder."""
        head = self._head(task)
        spec = head.spec
        ad = self.adapter
        tensors = {ad.prefixed(k): v for k, v in self.encoder.state_dict().items()}
        # a head that owns its pooler (base checkpoint without one) gives the stock pooler
        for name, layer in zip(spec.layers, head.layers):
            target = ad.prefixed(name) if name.startswith("pooler.") else name
            tensors[f"{target}.weight"] = layer.weight.detach()
            tensors[f"{target}.bias"] = layer.bias.detach()
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        cfg = dict(self.config)
        labels = list(spec.labels)
        arch = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                "distilbert": "DistilBertForSequenceClassification"}[ad.model_type]
        cfg.update(
            architectures=[arch],
            id2label={str(i): n for i, n in enumerate(labels)},
            label2id={n: i for i, n in enumerate(labels)},
            num_labels=len(labels),
        )
        cfg.pop("guardmerge", None)
        with atomic_dir(path, force=force) as tmp:
            write_model_folder(tmp, tensors, cfg, self.tokenizer)
        return Path(path)


def load_any(path: str | Path, task: str | None = None) -> MultiHeadModel:
    """A merged folder as is, or a stock classifier folder as a one-head model."""
    cfg = Path(path) / "config.json"
    if cfg.is_file() and "guardmerge" in json.loads(cfg.read_text()):
        return MultiHeadModel.from_pretrained(path)
    return MultiHeadModel.from_classifier(path, task)


def head_from_tensors(task: str, spec: HeadSpec, tensors: Mapping[str, torch.Tensor]) -> Head:
    shapes = []
    for layer in spec.layers:
        key = f"{HEAD_PREFIX}{task}.{layer}.weight"
        if key not in tensors or f"{HEAD_PREFIX}{task}.{layer}.bias" not in tensors:
            raise CheckpointError(f"head '{task}': tensor '{key}' (or its bias) is missing")
        shapes.append(tuple(tensors[key].shape))
    head = Head(spec, shapes)
    with torch.no_grad():
        for layer_name, layer in zip(spec.layers, head.layers):
            layer.weight.copy_(tensors[f"{HEAD_PREFIX}{task}.{layer_name}.weight"])
            layer.bias.copy_(tensors[f"{HEAD_PREFIX}{task}.{layer_name}.bias"])
    if head.layers[-1].out_features != len(spec.labels):
        raise CheckpointError(
            f"head '{task}' has {head.layers[-1].out_features} outputs but "
            f"{len(spec.labels)} label names"
        )
    return head


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder`` (None when there is none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # no tokenizer files, or unreadable ones
        log.warning("no usable tokenizer in %s (%s); predict() will need one", folder, exc)
        return None


def write_model_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    tokenizer: Any = None,
) -> None:
    """Write weights (safetensors), ``config.json`` and the tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    from guardmerge.writer import write_tensors

    write_tensors(folder, tensors)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=False) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def folder_config(
    config: Mapping[str, Any], heads: Mapping[str, HeadSpec], info: Mapping[str, Any]
) -> dict[str, Any]:
    """``config.json`` of a merged folder: the encoder config plus a ``guardmerge`` section."""
    from guardmerge import __version__

    cfg = {k: v for k, v in config.items() if k != "guardmerge"}
    cfg["guardmerge"] = {
        "version": __version__,
        "heads": {t: s.to_dict() for t, s in heads.items()},
        **{k: v for k, v in info.items() if k not in ("heads", "version")},
    }
    return cfg
