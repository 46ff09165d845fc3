"""How the command line explains itself: "did you mean ...?" for a misspelt option or command,
and the stage table of ``chexformer summary``.

Importing this module does not import torch; :func:`model_table` imports it when called.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn

__all__ = ["ArgumentParser", "model_table"]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors suggest the closest option or command.

    Subcommand parsers are of the same class, and an unknown option is reported by the parser
    of the subcommand it was given to, with that subcommand's usage and options.
    """

    _commands: Any = None  # the subparsers action, once add_subparsers was called

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no silent prefix matching: --fine-tune-layer is an error with a suggestion, not a guess
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", type(self))
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(parsed).error("unrecognized arguments: " + " ".join(extras))
        return parsed

    def error(self, message: str) -> NoReturn:
        super().error(message + self._suggestion(message))

    def _chosen(self, ns: argparse.Namespace) -> ArgumentParser:
        """The parser of the (deepest) subcommand the command line chose."""
        if self._commands is not None:
            sub = self._commands.choices.get(getattr(ns, self._commands.dest, None))
            if isinstance(sub, ArgumentParser):
                return sub._chosen(ns)
        return self

    def _suggestion(self, message: str) -> str:
        if message.startswith("unrecognized arguments: "):
            options = [o for action in self._actions for o in action.option_strings]
            hints = []
            for word in message.split(": ", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag.startswith("-") and not _is_number(flag):
                    close = difflib.get_close_matches(flag, options, n=1)
                    if close and close[0] not in hints:
                        hints.append(close[0])
            return f" (did you mean {', '.join(hints)}?)" if hints else ""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            allowed = [c.strip().strip("'\"") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), allowed, n=1)
            return f" (did you mean {close[0]}?)" if close else ""
        return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def model_table(model: Any, cfg: Any, weights: object | None) -> list[str]:
    """A short description of the model ``cfg`` built: one row per stage with its output shape
    for a (1, 3, img_size, img_size) input, parameter count and whether it trains; totals; the
    input -> logits line; and ``weights``, the backbone load report (None: random initialisation)."""
    import torch

    from chexformer.model import count_parameters

    img_size = cfg.img_size
    rows: list[tuple[str, list, Any]] = []  # (label, parameters, module whose output shape is shown)
    children = list(model.backbone.named_children())
    n_stem = next((i for i, (name, _) in enumerate(children) if name.startswith("denseblock")), 0)
    if n_stem:
        stem = [m for _, m in children[:n_stem]]
        rows.append((f"backbone.{children[0][0]}..{children[n_stem - 1][0]}",
                     [p for m in stem for p in m.parameters()], stem[-1]))
    for name, module in children[n_stem:]:
        rows.append((f"backbone.{name}", list(module.parameters()), module))
    if hasattr(model, "proj"):  # ChexFormer: tokens and the encoder
        rows.append(("proj (token projection)", list(model.proj.parameters()), model.proj))
        rows.append(("class token + positions", [model.cls_token, model.pos_embed], model.pos_drop))
        layers = list(model.layers)
        if len(layers) > 6:
            rows.append((f"layers.0..{len(layers) - 1} (encoder)",
                         [p for layer in layers for p in layer.parameters()], layers[-1]))
        else:
            rows += [(f"layers.{i} (encoder)", list(layer.parameters()), layer) for i, layer in enumerate(layers)]
        rows.append(("norm", list(model.norm.parameters()), model.norm))
        rows.append(("head (class token + mean token)", list(model.head.parameters()), model.head))
    else:  # the linear baseline
        rows.append(("global average pool", [], model.head_drop))
        rows.append(("head", list(model.head.parameters()), model.head))

    shapes: dict[int, tuple[int, ...]] = {}

    def record(module: Any, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output  # encoder layers return (x, attention)
        shapes[id(module)] = tuple(out.shape)

    was_training = model.training
    handles = [module.register_forward_hook(record) for _, _, module in rows]
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    table = [("stage", "output", "params", "trains")]
    for label, params, module in rows:
        n_train = sum(p.numel() for p in params if p.requires_grad)
        n_all = sum(p.numel() for p in params)
        trains = "-" if not n_all else "yes" if n_train == n_all else "frozen" if not n_train else "partly"
        table.append((label, str(shapes.get(id(module), "?")), f"{n_all:,}", trains))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [f"{type(model).__name__}, {getattr(model, 'num_classes', '?')} classes, input {img_size} px"]
    lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in table]

    trainable, frozen = count_parameters(model)
    feats = shapes[id(children[-1][1])]  # (1, 1024, H/32, W/32)
    tokens = (f"{feats[-1] * feats[-2]} tokens + class token" if hasattr(model, "proj")
              else "global average pool")
    if weights is None:
        why = f"no file at {cfg.pretrained_path}" if cfg.backbone_weights == "file" else "backbone_weights none"
        weights = f"random initialisation ({why})"
    lines += [
        f"parameters: {trainable:,} trainable, {frozen:,} frozen",
        f"input (1, 3, {img_size}, {img_size}) -> backbone map {feats} -> {tokens} -> logits {tuple(logits.shape)}",
        f"backbone weights: {weights}",
    ]
    return lines
