"""Cutting a decoder LM for split learning (SFPrompt), per a :class:`SplitSpec`.

The device part is a :class:`DeviceHead` (frozen token embedding, P trainable
soft prompts prepended to the embedded tokens, the first k frozen decoder
blocks) and a :class:`DeviceTail` (trainable copies of the final norm and of
the LM head, untied from the embedding). The server part is a
:class:`Trunk`: the remaining decoder blocks, frozen, without the final norm.

Composed, ``tail(trunk(head(x)))`` computes exactly what the unsplit model
computes on ``[prompts; embed(x)]`` (tested to float tolerance, losses and
gradients). Blocks run through the model's own decoder ``forward`` (masks,
rotary positions) on a slice of its layers, so any Llama-style
``*ForCausalLM`` with ``model.layers`` / ``model.norm`` / ``lm_head`` works.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import PreTrainedModel

from protocols import SplitSpec

__all__ = [
    "DeviceHead",
    "DeviceTail",
    "PromptedLM",
    "SplitError",
    "Trunk",
    "build_split",
    "device_parts",
    "load_trainable_state",
    "split_spec_for",
    "trainable_state",
]


class SplitError(ValueError):
    """The model cannot be cut as the spec asks."""


def _decoder(model: PreTrainedModel) -> nn.Module:
    decoder = getattr(model, "model", None)
    if (
        decoder is None
        or not hasattr(decoder, "layers")
        or not hasattr(decoder, "norm")
    ):
        raise SplitError(
            f"{type(model).__name__} is not a Llama-style decoder "
            "(needs model.layers, model.norm and lm_head)"
        )
    return decoder


def _decoder_slice(decoder: nn.Module, start: int, stop: int) -> nn.Module:
    """The decoder's own forward over layers [start, stop), without final norm."""
    part = copy.copy(decoder)  # shares every parameter with ``decoder``
    part._modules = dict(decoder._modules)  # type: ignore[assignment]
    part.layers = nn.ModuleList(list(decoder.layers)[start:stop])
    part.norm = nn.Identity()
    return part


def split_spec_for(
    model: PreTrainedModel,
    name: str,
    *,
    num_prompts: int,
    client_blocks: int,
    max_length: int,
    tail: str = "norm+head",
) -> SplitSpec:
    """The :class:`SplitSpec` of cutting ``model`` (named ``name``) this way."""
    config = model.config
    return SplitSpec(
        model=name,
        num_prompts=num_prompts,
        client_blocks=client_blocks,
        num_blocks=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        activation_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        max_length=max_length,
        tail=tail,
    )


class DeviceHead(nn.Module):
    """Embedding + soft prompts (+ first k blocks): the device's front.

    The prompts start as the embeddings of P token ids drawn with a private
    generator seeded by ``init_seed`` (a common initialisation for prompt
    tuning), so every party starts from the same prompts.
    """

    def __init__(
        self, model: PreTrainedModel, spec: SplitSpec, *, init_seed: int = 0
    ) -> None:
        super().__init__()
        decoder = _decoder(model)
        self.spec = spec
        self.embed = model.get_input_embeddings()
        gen = torch.Generator().manual_seed(init_seed)
        ids = torch.randint(
            self.embed.num_embeddings, (spec.num_prompts,), generator=gen
        )
        with torch.no_grad():
            init = self.embed.weight[ids.to(self.embed.weight.device)].detach().clone()
        self.prompts = nn.Parameter(init)
        self.blocks = (
            _decoder_slice(decoder, 0, spec.client_blocks)
            if spec.client_blocks
            else None
        )

    def embed_with_prompts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prompts; embed(input_ids)]`` (B, P+T, D) and its (B, P+T) mask."""
        tokens = self.embed(input_ids)  # (B, T, D)
        batch = tokens.shape[0]
        prompts = self.prompts.unsqueeze(0).expand(batch, -1, -1).to(tokens.dtype)
        hidden = torch.cat([prompts, tokens], dim=1)
        ones = attention_mask.new_ones((batch, self.spec.num_prompts))
        return hidden, torch.cat([ones, attention_mask], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, mask)``: (B, P+T, D) activations at the cut and (B, P+T) mask."""
        hidden, mask = self.embed_with_prompts(input_ids, attention_mask)
        if self.blocks is not None:
            hidden = self.blocks(
                inputs_embeds=hidden, attention_mask=mask, use_cache=False
            )
            hidden = hidden.last_hidden_state
        return hidden, mask


class Trunk(nn.Module):
    """The server's frozen body: decoder blocks k..L-1, no final norm."""

    def __init__(self, model: PreTrainedModel, spec: SplitSpec) -> None:
        super().__init__()
        decoder = _decoder(model)
        if int(model.config.num_hidden_layers) != spec.num_blocks:
            raise SplitError(
                f"spec says {spec.num_blocks} blocks, model has "
                f"{model.config.num_hidden_layers}"
            )
        self.body = _decoder_slice(decoder, spec.client_blocks, spec.num_blocks)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, S, D) activations at the cut -> (B, S, D) body output."""
        out = self.body(
            inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state


class DeviceTail(nn.Module):
    """Final norm and LM head.

    The norm always trains (a copy). With ``train_head`` the head is an untied
    copy that trains; without it the model's own frozen head is used as is,
    so a device does not hold a second vocabulary-sized matrix (113 MB in
    float32 for SmolLM2-135M, whose head is tied to the embedding).
    """

    def __init__(self, model: PreTrainedModel, *, train_head: bool = True) -> None:
        super().__init__()
        self.norm = copy.deepcopy(_decoder(model).norm)
        head = model.get_output_embeddings()
        if train_head:
            self.lm_head = nn.Linear(
                head.in_features, head.out_features, bias=head.bias is not None
            )
            with torch.no_grad():
                self.lm_head.weight.copy_(head.weight)
                if head.bias is not None:
                    self.lm_head.bias.copy_(head.bias)
            self.lm_head.to(head.weight.device, head.weight.dtype)
        else:
            self.lm_head = head
        self.norm.requires_grad_(True)
        self.lm_head.requires_grad_(train_head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, D) body output -> (B, S, V) logits."""
        return self.lm_head(self.norm(hidden))


def build_split(
    model: PreTrainedModel, spec: SplitSpec, *, init_seed: int = 0
) -> tuple[DeviceHead, Trunk, DeviceTail]:
    """Cut ``model`` per ``spec``; base parameters are frozen, shared, not copied."""
    model.requires_grad_(False)
    tail = DeviceTail(model, train_head=spec.tail == "norm+head")
    return DeviceHead(model, spec, init_seed=init_seed), Trunk(model, spec), tail


def device_parts(
    model: PreTrainedModel, spec: SplitSpec, *, init_seed: int = 0
) -> tuple[DeviceHead, DeviceTail]:
    """The device's parts only: the server's blocks are dropped from ``model``.

    After this call ``model`` keeps its embedding, its first
    ``spec.client_blocks`` blocks and its norm/head, so the device's memory
    holds no server block.
    """
    decoder = _decoder(model)
    if int(model.config.num_hidden_layers) != spec.num_blocks:
        raise SplitError(
            f"spec says {spec.num_blocks} blocks, model has {model.config.num_hidden_layers}"
        )
    model.requires_grad_(False)
    decoder.layers = nn.ModuleList(list(decoder.layers)[: spec.client_blocks])
    tail = DeviceTail(model, train_head=spec.tail == "norm+head")
    return DeviceHead(model, spec, init_seed=init_seed), tail


def trainable_state(head: DeviceHead, tail: DeviceTail) -> dict[str, torch.Tensor]:
    """The tensors SFPrompt trains and aggregates, by stable name."""
    state = {"prompts": head.prompts}
    state.update(
        {f"tail.{n}": p for n, p in tail.named_parameters() if p.requires_grad}
    )
    return state


def load_trainable_state(
    head: DeviceHead, tail: DeviceTail, tensors: dict[str, torch.Tensor]
) -> None:
    """Copy aggregated tensors into the prompts and tail (names already checked)."""
    live = trainable_state(head, tail)
    with torch.no_grad():
        for name, value in tensors.items():
            live[name].copy_(value)


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class PromptedLM(nn.Module):
    """head -> trunk -> tail in one module: the whole split model, locally.

    Used for central evaluation; ``forward`` returns logits for the token
    positions only (prompts dropped), so it is a drop-in causal LM for
    scoring, and ``generate`` decodes greedily.
    """

    def __init__(self, head: DeviceHead, trunk: Trunk, tail: DeviceTail) -> None:
        super().__init__()
        self.head, self.trunk, self.tail = head, trunk, tail
        # Not a submodule (a tuple): state_dict and ONNX export stay as they are.
        self._whole: tuple[nn.Module, ...] = ()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Output:
        """Logits (B, T, V) of the token positions."""
        hidden, mask = self.head(input_ids, attention_mask)
        logits = self.tail(self.trunk(hidden, mask))
        return _Output(logits[:, self.head.spec.num_prompts :])

    def _decoder(self) -> nn.Module:
        """All blocks, head's then trunk's, as one decoder (for a KV cache)."""
        if not self._whole:
            layers = list(self.head.blocks.layers) if self.head.blocks else []
            whole = copy.copy(self.trunk.body)
            whole._modules = dict(self.trunk.body._modules)  # type: ignore[assignment]
            whole.layers = nn.ModuleList(layers + list(self.trunk.body.layers))
            self._whole = (whole,)
        return self._whole[0]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int,
        **_: object,
    ) -> torch.Tensor:
        """Greedy decoding of left-padded prompts with a KV cache; stops at EOS.

        Positions come from the attention mask (pads take none), so a row
        decodes the same alone or in a padded batch. The KV cache is a
        :class:`transformers.DynamicCache`, passed as ``cache`` (transformers 5.24
        renamed the decoders' ``past_key_values`` argument and warns on the old
        name; a decoder without ``cache`` still gets ``past_key_values``).
        """
        from transformers import DynamicCache

        decoder = self._decoder()
        hidden, mask = self.head.embed_with_prompts(input_ids, attention_mask)
        cache = DynamicCache()
        cache_arg = (
            "cache"
            if "cache" in inspect.signature(decoder.forward).parameters
            else "past_key_values"
        )
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _step in range(max_new_tokens):
            out = decoder(
                inputs_embeds=hidden,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: cache},
            )
            logits = self.tail(out.last_hidden_state[:, -1:])[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
            hidden = self.head.embed(nxt[:, None]).to(hidden.dtype)
            positions = positions[:, -1:] + 1
        return ids
