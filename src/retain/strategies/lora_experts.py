"""Mixture of LoRA experts with cluster-conditional routing (MoCLE-style).

When a task starts, its training instructions are embedded (the frozen base model's
mean-pooled hidden states) and clustered by k-means; each cluster gets a new LoRA
expert. A universal expert is active for every input. An input is routed to the expert
of its nearest cluster centroid (cosine) -- while task t trains, among task t's clusters;
at inference, among all clusters, with no task identity -- and the layer computes
W x + s * (B_u A_u x + B_c A_c x). New tasks add clusters and experts; old experts are
frozen (the universal expert keeps training: it is the one shared part).

Written by hand: PEFT activates adapters per model, not per example, and its mixed-batch
inference takes one adapter per row; a routed pair per row needs the small layer below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from retain.embeddings import ModelWrapper, embed_texts, pooled_query
from retain.strategies.base import Context, Strategy, register

UNIVERSAL = "universal"


class ExpertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clusters_per_task: int = Field(default=2, ge=1, description="k of the k-means run on each task's instructions")
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    universal: bool = Field(default=True, description="an expert active for every input")


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (k-means++ seeding, Lloyd steps on cosine similarity): (centroids, labels).

    Written by hand: a few hundred vectors per task; scikit-learn would add scipy for it.
    """
    points = F.normalize(points.float(), dim=1)
    n = points.shape[0]
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    centroids = [points[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        dist = (1 - points @ torch.stack(centroids).T).min(1).values.clamp(min=0)
        if float(dist.sum()) == 0.0:
            break
        centroids.append(points[int(torch.multinomial(dist, 1, generator=gen))])
    c = torch.stack(centroids)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        labels = (points @ c.T).argmax(1)
        new = torch.stack([F.normalize(points[labels == j].mean(0), dim=0) if (labels == j).any() else c[j]
                           for j in range(c.shape[0])])
        if torch.allclose(new, c):
            break
        c = new
    return c, (points @ c.T).argmax(1)


class ExpertLinear(torch.nn.Module):
    """A linear layer plus gated LoRA experts: W x + s * sum_e gate[row, e] * B_e A_e x."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.r, self.scale = base, r, alpha / r
        self.A = torch.nn.ParameterDict()
        self.B = torch.nn.ParameterDict()
        self.gates: dict[str, torch.Tensor] | None = None  # expert -> (batch,) weights, set per forward

    def add(self, name: str) -> None:
        w = self.base.weight
        a = torch.empty(self.r, self.base.in_features, dtype=w.dtype, device=w.device)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's LoRA: A random, B zero
        self.A[name] = torch.nn.Parameter(a)
        self.B[name] = torch.nn.Parameter(torch.zeros(self.base.out_features, self.r, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.gates:
            return out
        for name, gate in self.gates.items():
            if bool((gate != 0).any()):
                delta = (x @ self.A[name].T) @ self.B[name].T
                out = out + self.scale * gate.view(-1, *([1] * (x.dim() - 1))).to(out.dtype) * delta
        return out


class ExpertMixture(ModelWrapper):
    """The model with routed LoRA experts; callers keep passing token ids."""

    def __init__(self, model: torch.nn.Module, options: ExpertOptions) -> None:
        super().__init__(model)
        self.options = options
        self.layers: list[ExpertLinear] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if name in options.target_modules and isinstance(child, torch.nn.Linear):
                    layer = ExpertLinear(child, options.r, options.alpha)
                    setattr(parent, name, layer)
                    self.layers.append(layer)
        if not self.layers:
            raise ValueError(f"lora_experts.target_modules {options.target_modules} match no linear layer")
        self.register_buffer("centroids", torch.zeros(0, model.config.hidden_size))
        self.cluster_expert: list[str] = []  # expert name of each centroid row
        self.cluster_task: list[str] = []
        self.training_task: str | None = None
        self.last_routes: list[str] = []
        if options.universal:
            self.add_expert(UNIVERSAL)

    def add_expert(self, name: str) -> None:
        for layer in self.layers:
            layer.add(name)

    def expert_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers for p in (layer.A[name], layer.B[name])]

    def _set(self, gates: dict[str, torch.Tensor] | None) -> None:
        for layer in self.layers:
            layer.gates = gates

    @torch.no_grad()
    def embed(self, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        self._set(None)
        return embed_texts(self.base, tokenizer, texts, batch_size)

    def query(self, input_ids, attention_mask, labels, query_mask=None) -> torch.Tensor:
        self._set(None)  # the frozen base: no expert active
        return pooled_query(self.base, input_ids, attention_mask, labels, query_mask)

    def route(self, q: torch.Tensor) -> list[str]:
        """The expert of each row's nearest centroid (the training task's clusters while it trains)."""
        if self.centroids.shape[0] == 0:
            return [""] * q.shape[0]
        sims = q @ self.centroids.float().T
        if self.training_task is not None:
            allowed = torch.tensor([t == self.training_task for t in self.cluster_task], device=sims.device)
            sims = sims.masked_fill(~allowed, float("-inf"))
        return [self.cluster_expert[i] for i in sims.argmax(1).tolist()]

    def _gates(self, input_ids, attention_mask, labels, query_mask=None) -> None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        routes = self.route(self.query(input_ids, attention_mask, labels, query_mask))
        self.last_routes = routes
        b, dev = input_ids.shape[0], input_ids.device
        gates = {UNIVERSAL: torch.ones(b, device=dev)} if self.options.universal else {}
        for name in sorted(set(routes) - {""}):
            gates[name] = torch.tensor([1.0 if r == name else 0.0 for r in routes], device=dev)
        self._set(gates)

    def forward(self, input_ids=None, attention_mask=None, labels=None, query_mask=None, **kwargs):
        self._gates(input_ids, attention_mask, labels, query_mask)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        self._gates(input_ids, attention_mask, None)
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@register
class LoraExperts(Strategy):
    name = "lora-experts"
    not_private = "its routing centroids are k-means clusters of private training inputs, kept without noise"
    data_parallel = ""  # its clusters are computed on every process alike; each example is routed alone
    sharded = "it wraps the model in a router whose experts live outside the sharded layers"
    summary = "mixture of LoRA experts: k-means clusters of each task's instructions, one expert per cluster, routed"
    not_exportable = "it routes each input among LoRA experts inside its own layers, which PEFT cannot load"
    options_key = "lora_experts"
    Options = ExpertOptions
    owns_parameters = True
    freezes_earlier = True
    rewrites_input = True
    per_task_phases = True

    def setup(self, ctx: Context):
        for p in ctx.model.parameters():
            p.requires_grad = False
        self.mix = ExpertMixture(ctx.model, self.options)
        return self.mix

    def _mix(self, ctx: Context) -> ExpertMixture:
        return ctx.accelerator.unwrap_model(ctx.model)

    def _add_task_clusters(self, ctx: Context, task) -> None:
        mix = self._mix(ctx)
        if task.name in mix.cluster_task:
            return
        points = mix.embed(ctx.tokenizer, [ex.input for ex in task.train], ctx.config.eval.batch_size)
        centroids, _ = kmeans(points, self.options.clusters_per_task, seed=ctx.config.seed)
        for j in range(centroids.shape[0]):
            name = f"{task.name}.{j}".replace(".", "_")
            mix.add_expert(name)
            mix.cluster_expert.append(name)
            mix.cluster_task.append(task.name)
        mix.centroids = torch.cat([mix.centroids, centroids.to(mix.centroids)])

    def before_task(self, ctx: Context, tasks) -> None:
        self._add_task_clusters(ctx, tasks[0])
        mix = self._mix(ctx)
        mix.training_task = tasks[0].name
        # The flags are set here, not in trainable_parameters: strategies later in the stack
        # (lwf's teacher snapshot) read them in their own before_task.
        keep = {id(p) for p in self._training(mix)}
        for p in mix.parameters():
            p.requires_grad = id(p) in keep

    def _training(self, mix: ExpertMixture) -> list[torch.nn.Parameter]:
        names = [n for n, t in zip(mix.cluster_expert, mix.cluster_task) if t == mix.training_task]
        names += [UNIVERSAL] if self.options.universal else []
        return [p for n in names for p in mix.expert_parameters(n)]

    def trainable_parameters(self, ctx: Context):
        keep = {id(p) for p in self._training(self._mix(ctx))}
        return [p for p in self._mix(ctx).parameters() if id(p) in keep]

    def after_task(self, ctx: Context, tasks) -> None:
        self._mix(ctx).training_task = None

    def stats(self) -> dict:
        mix = getattr(self, "mix", None)
        return {"experts": len(mix.cluster_expert) + int(self.options.universal)} if mix is not None else {}

    def state_dict(self) -> dict:
        mix = getattr(self, "mix", None)
        if mix is None:
            return {}
        return {"clusters": [[e, t] for e, t in zip(mix.cluster_expert, mix.cluster_task)],
                "centroids": mix.centroids.tolist()}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if not state:
            return
        mix = self._mix(ctx)
        for expert, task in state["clusters"]:
            mix.add_expert(expert)
            mix.cluster_expert.append(expert)
            mix.cluster_task.append(task)
        mix.centroids = torch.tensor(state["centroids"], dtype=mix.centroids.dtype)
