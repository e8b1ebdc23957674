"""What a compiled program does per step, read from its optimised HLO text.

XLA's own ``cost_analysis()`` counts the body of a ``while`` loop once, not once per
iteration, so a model with ``scan_layers`` looks ``depth`` times cheaper than it is (and
its collectives as rare). This reader walks the program's computations from ``ENTRY``
through fusions, loops and conditionals, multiplying each loop body by its trip count,
and adds up

* the matmul and convolution FLOPs (``dot`` and ``convolution``: nearly all of a ViT's
  or a VQGAN's arithmetic; elementwise work is left out), and
* the collectives: kind, how many, and the bytes of their results.

It reads the text ``compiled.as_text()`` prints; nothing in it depends on a backend,
though the fused ``all-reduce-scatter`` computations are how TPU writes reduce-scatter.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"^[su]\d+\[\]\S*\s+constant\((\d+)\)")


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attributes: str


@dataclasses.dataclass
class Collective:
    count: float = 0
    bytes: float = 0


@dataclasses.dataclass
class Totals:
    """Per step, on one device: each loop body counted as often as it runs."""
    dot_conv_flops: float = 0.0
    collectives: dict = dataclasses.field(
        default_factory=lambda: collections.defaultdict(Collective))
    loops: int = 0                  # while loops with more than one iteration
    unknown_trip_counts: int = 0    # loops whose count could not be read (counted once)

    def add(self, other: "Totals", times: float) -> None:
        self.dot_conv_flops += times * other.dot_conv_flops
        for kind, c in other.collectives.items():
            self.collectives[kind].count += times * c.count
            self.collectives[kind].bytes += times * c.bytes
        self.loops += other.loops
        self.unknown_trip_counts += other.unknown_trip_counts


def _split_top_level(text: str) -> tuple[str, str]:
    """('(...)' balanced prefix, rest) when text starts with '(', else (first word, rest)."""
    if not text.startswith("("):
        head, _, rest = text.partition(" ")
        return head, rest
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[:i + 1], text[i + 1:].lstrip()
    return text, ""


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    name, rest = match.groups()
    shape, rest = _split_top_level(rest)
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    operand_text, attributes = _split_top_level("(" + rest)
    operands = [o.strip().split()[-1].lstrip("%") if o.strip() else ""
                for o in operand_text[1:-1].split(",")]
    return _Instruction(name, shape, opcode.strip(), operands, attributes)


def parse_module(text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """({computation name: instructions}, name of the ENTRY computation)."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instruction = _parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text()).")
    return computations, entry


def array_dims(shape: str) -> list[tuple[str, list[int]]]:
    """[(dtype, dims)] of every array in a (possibly tuple) HLO shape."""
    return [(dtype, [int(d) for d in dims.split(",") if d])
            for dtype, dims in _ARRAY.findall(shape.split("{")[0] if not shape.startswith("(")
                                              else shape)]


def array_bytes(shape: str) -> list[float]:
    """Bytes of each array in a (possibly tuple) HLO shape."""
    return [_DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in array_dims(shape)]


def _dims_attribute(attributes: str, key: str) -> list[int]:
    match = re.search(key + r"=\{([\d,]*)\}", attributes)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _dot_flops(ins: _Instruction, shapes: dict[str, str]) -> float:
    out = array_dims(ins.shape)[0][1]
    lhs = array_dims(shapes.get(ins.operands[0], ""))
    if not lhs:
        return 0.0
    contracting = _dims_attribute(ins.attributes, "lhs_contracting_dims")
    return 2.0 * math.prod(out) * math.prod(lhs[0][1][d] for d in contracting)


def _window(attributes: str, key: str, rank: int, default: int) -> list:
    match = re.search(r"window=\{[^}]*\b" + key + r"=([\d_x-]+)", attributes)
    if not match:
        return [default] * rank
    return match.group(1).split("x")


def _taps(out: int, kernel: int, size: int, pad_lo: int, stride: int, lhs_dilation: int,
          rhs_dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read an input
    element rather than padding: TPU writes matmuls as convolutions whose windows are
    mostly padding, so window size x output size would overcount them many times."""
    extent = (size - 1) * lhs_dilation + 1
    taps = 0
    for o in range(out):
        for k in range(kernel):
            position = o * stride - pad_lo + k * rhs_dilation
            taps += 0 <= position < extent and position % lhs_dilation == 0
    return taps


def _conv_flops(ins: _Instruction, shapes: dict[str, str]) -> float:
    """2 x (batch x output features) x (valid taps, dimension by dimension) x input
    features per group."""
    out = array_dims(ins.shape)[0][1]
    lhs = array_dims(shapes.get(ins.operands[0], ""))
    kernel = array_dims(shapes.get(ins.operands[1], ""))
    labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)(?:,|$)", ins.attributes)
    if not kernel or not lhs or not labels:
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    lhs_size = dict(zip(lhs_labels, lhs[0][1]))
    kernel_size = dict(zip(kernel_labels, kernel[0][1]))
    out_size = dict(zip(out_labels, out))
    spatial = [c for c in kernel_labels if c.isdigit()]
    rank = len(spatial)
    pads = _window(ins.attributes, "pad", rank, "0_0")
    strides = _window(ins.attributes, "stride", rank, 1)
    lhs_dilations = _window(ins.attributes, "lhs_dilate", rank, 1)
    rhs_dilations = _window(ins.attributes, "rhs_dilate", rank, 1)
    flops = 2.0 * out_size["b"] * out_size["f"] * kernel_size["i"]
    for n, dim in enumerate(sorted(spatial)):
        flops *= _taps(out_size[dim], kernel_size[dim], lhs_size[dim],
                       int(str(pads[n]).split("_")[0]), int(strides[n]),
                       int(lhs_dilations[n]), int(rhs_dilations[n]))
    return flops


def _trip_count(ins: _Instruction, computations) -> int | None:
    known = _TRIP.search(ins.attributes)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", ins.attributes)
    constants = [int(m.group(1)) for c in computations.get(condition.group(1) if condition
                                                             else "", [])
                 if (m := _CONSTANT.match(f"{c.shape} {c.opcode}({','.join(c.operands)})"))]
    # A scan's condition is `counter < N`: one integer constant.
    return constants[0] if len(constants) == 1 else None


def analyse(text: str, per_iteration: bool = True) -> Totals:
    """Per-step totals of the optimised HLO ``text`` (``compiled.as_text()``).

    ``per_iteration=False`` counts every loop body once, as XLA's cost analysis does: the
    ratio of the two dot/convolution counts corrects XLA's loop-blind estimates."""
    computations, entry = parse_module(text)
    memo: dict[str, Totals] = {}

    def visit(name: str) -> Totals:
        if name in memo:
            return memo[name]
        totals = Totals()
        memo[name] = totals  # a (malformed) cycle counts once instead of recursing forever
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        for ins in instructions:
            if ins.opcode == "dot":
                totals.dot_conv_flops += _dot_flops(ins, shapes)
            elif ins.opcode == "convolution":
                totals.dot_conv_flops += _conv_flops(ins, shapes)
            kind = ins.opcode.removesuffix("-start")
            if kind in COLLECTIVES and not ins.opcode.endswith("-done"):
                if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                    kind = "reduce-scatter"  # TPU: all-reduce + slice fused as one
                # An async "-start" returns (operands, results, ...): its largest array is the
                # result; a plain collective's result is its whole shape.
                arrays = array_bytes(ins.shape) or [0]
                result = max(arrays) if ins.opcode.endswith("-start") else sum(arrays)
                totals.collectives[kind].count += 1
                totals.collectives[kind].bytes += result
            times = 1
            if ins.opcode == "while":
                trips = _trip_count(ins, computations)
                if trips is None:
                    totals.unknown_trip_counts += 1
                elif trips > 1:
                    totals.loops += 1
                times = (trips or 1) if per_iteration else 1
            for key, callee in _CALLED.findall(ins.attributes):
                if key in ("to_apply", "condition"):
                    continue  # scalar reducers, loop conditions: no matmuls, no collectives
                totals.add(visit(callee), times if key == "body" else 1)
            for branches in _BRANCHES.findall(ins.attributes):
                for callee in branches.split(","):
                    totals.add(visit(callee.strip().lstrip("%")), 1)
        return totals

    return visit(entry)
