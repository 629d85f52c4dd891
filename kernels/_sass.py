"""GPU speed predicted from the machine code: the steady-state path of a kernel's SASS, its
instructions per element by class, and the share of an H100 copy an issue-limited model predicts.

Used by :mod:`._compile_check` (the Triton kernels) and :mod:`._compile_check_cuda` (the CUDA
kernels); the method, its throughputs and their sources, and what it cannot see are in
docs/performance.md ("Predicted from the compiled code"). Only the standard library: the CUDA twin
needs no Triton but for its ``cuobjdump``.

The steady-state path (:func:`steady_state`). The control-flow graph of a function is built from
its branches (``BRA``, ``EXIT``, ``CALL``/``RET``). A path's weight is (bytes moved by its wide
global accesses, 64 bits and more, fewest instructions): the path a large aligned tensor takes is
the one that moves the most data with vector accesses (Triton's full block, not its masked tail;
the CUDA aligned loop, not the element-by-element rest; the update that runs, not the skipped
step) and, among those, the one that skips every slow path (IEEE division and square root of
operands out of range, the found-inf flag raised, lanes of a reduction that store). A ``CALL`` costs
its callee's shortest path. A kernel without loops (Triton: one block per program) is one path from
the entry to ``EXIT``; a kernel with loops (CUDA) is the iteration of the loop with the heaviest
such path, plus the path from the entry into it and from it to ``EXIT``, amortised over the
elements a thread handles per launch chunk.
"""

from __future__ import annotations

import dataclasses
import math
import re

# ---- the model (docs/performance.md) --------------------------------------------------------------

#: NVIDIA H100 SXM5: streaming multiprocessors
H100_SMS = 132
#: thread instructions issued per SM per clock: 4 schedulers, one warp instruction (32 threads) each
ISSUE_PER_SM_CLOCK = 128
#: share of the issue slots a kernel fills (dependent instructions, stalls): an assumption
ISSUE_EFFICIENCY = 0.8
#: bytes per second of a device-to-device copy on an H100 SXM5 (HBM3, 3.35 TB/s peak)
COPY_BANDWIDTH = 2.9e12
#: GHz: the clock the budget is held at (sustained under load), and the boost clock
CLOCK_BUDGET_GHZ = 1.755
CLOCK_BOOST_GHZ = 1.98
#: the exponent of the smooth maximum of memory and issue time (see predicted_share)
OVERLAP_NORM = 4


def issue_time(instructions_per_element: float, clock_ghz: float) -> float:
    """Seconds per element that the instructions take to issue on a whole H100."""
    rate = H100_SMS * ISSUE_PER_SM_CLOCK * clock_ghz * 1e9 * ISSUE_EFFICIENCY
    return instructions_per_element / rate


def memory_time(bytes_per_element: float) -> float:
    """Seconds per element that the bytes take at copy bandwidth."""
    return bytes_per_element / COPY_BANDWIDTH


def predicted_share(instructions_per_element: float, bytes_per_element: float, clock_ghz: float) -> float:
    """Percent of copy bandwidth: memory time / (memory time^4 + issue time^4)^(1/4).

    The issue limit and the memory limit overlap imperfectly near the corner, so the time is a
    smooth maximum of the two rather than the larger one: a kernel whose issue time is half its
    memory time runs at 98% of copy, one whose issue time equals it at 84%, one issue-bound by 2x
    at 49%.
    """
    mem = memory_time(bytes_per_element)
    issue = issue_time(instructions_per_element, clock_ghz)
    return 100.0 * mem / (mem**OVERLAP_NORM + issue**OVERLAP_NORM) ** (1.0 / OVERLAP_NORM)


def instruction_budget(bytes_per_element: float, share: float, clock_ghz: float = CLOCK_BUDGET_GHZ) -> float:
    """The most instructions per element that keep ``predicted_share`` at ``share`` percent or more."""
    ratio = ((100.0 / share) ** OVERLAP_NORM - 1.0) ** (1.0 / OVERLAP_NORM)
    return ratio * memory_time(bytes_per_element) / issue_time(1.0, clock_ghz)


# ---- parsing -------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")
_GUARD = re.compile(r"^@(!?U?P[0-7T])\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}

#: instruction classes by opcode (the part before the first dot); uniform-datapath ones start with U
CLASSES = {
    "fp32": "FADD FMUL FFMA FMNMX FSETP FSEL FCHK FSET FSWZADD FMNMX3 FADD32I FMUL32I FFMA32I",
    "fp64": "DADD DMUL DFMA DSETP DMNMX",
    "fp16": "HADD2 HMUL2 HFMA2 HMNMX2 HSETP2 HSET2",
    "mufu": "MUFU",
    "int": "IMAD IADD3 IADD LOP3 SHF LEA ISETP IMNMX IABS SEL PRMT FLO POPC BREV BMSK SGXT VIADD VIMNMX "
    "IMUL IDP IADD32I LOP32I IMAD32I LEA32I SHL SHR",
    "conversion": "F2F F2I I2F I2FP F2IP F2FP FRND I2I I2IP",
    "move": "MOV MOV32I",
    "memory": "LDG STG LD ST LDS STS LDL STL LDC ATOM ATOMG ATOMS RED LDGSTS LDSM",
    "control": "BRA BRX JMP JMX BSSY BSYNC EXIT CALL RET NOP WARPSYNC BAR BMOV YIELD BREAK KILL BPT",
    "predicate": "PLOP3 P2R R2P PSETP",
}
_CLASS_OF = {op: name for name, ops in CLASSES.items() for op in ops.split()}
#: global memory: generic (LD/ST: the address space resolved by the hardware) and global proper
GLOBAL_MEMORY = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    guard: str | None  # "P0", "!P1", ... or None
    opcode: str  # with modifiers: "LDG.E.128"
    operands: str

    @property
    def root(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def klass(self) -> str:
        """Its class: an opcode of CLASSES, "move" for IMAD.MOV and HFMA2.MMA (moves on the FMA pipes),
        "uniform" for the uniform datapath (U*, R2UR, S2UR), else "other"."""
        if self.opcode.startswith(("IMAD.MOV", "HFMA2.MMA")):
            return "move"
        if self.root.startswith("U") or self.root in ("R2UR", "S2UR"):
            return "uniform"
        return _CLASS_OF.get(self.root, "other")

    @property
    def global_bytes(self) -> int:
        """Bytes per thread this instruction moves to or from global memory (0 for others)."""
        if self.root not in GLOBAL_MEMORY:
            return 0
        for mod in self.opcode.split(".")[1:]:
            if mod in _WIDTH:
                return _WIDTH[mod]
        return 4

    @property
    def wide_bytes(self) -> int:
        """global_bytes of a vector access (64 bits and more), else 0."""
        return self.global_bytes if self.global_bytes >= 8 else 0

    @property
    def target(self) -> int | None:
        """The branch or call target address."""
        if self.root in ("BRA", "CALL", "JMP"):
            found = _TARGET.search(self.operands)
            if found is None:
                raise ValueError(f"no target in {self}")
            return int(found.group(1), 16)
        return None

    @property
    def conditional(self) -> bool:
        """A guarded instruction, or a branch on a predicate operand (``BRA P1, 0x..``)."""
        if self.guard is not None and self.guard not in ("PT", "UPT"):
            return True
        return self.root == "BRA" and re.match(r"^!?U?P[0-6]\s*,", self.operands.strip()) is not None

    def __str__(self) -> str:
        guard = f"@{self.guard} " if self.guard else ""
        return f"/*{self.address:04x}*/ {guard}{self.opcode} {self.operands}".rstrip()


def parse(sass: str) -> dict[str, list[Instruction]]:
    """The instructions of every function in ``cuobjdump -sass`` output, by (mangled) name."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in sass.splitlines():
        if "Function : " in line:
            current = functions.setdefault(line.split("Function : ", 1)[1].strip(), [])
            continue
        found = _LINE.match(line)
        if found is None or current is None:
            continue
        text = found.group(2)
        guard = _GUARD.match(text)
        if guard:
            text = text[guard.end() :]
        opcode, _, operands = text.partition(" ")
        current.append(Instruction(int(found.group(1), 16), guard.group(1) if guard else None, opcode, operands))
    return functions


# ---- the control-flow graph and the steady-state path --------------------------------------------


@dataclasses.dataclass
class Block:
    start: int  # index of its first instruction
    end: int  # one past its last
    successors: list[int]  # indices of the blocks' first instructions; empty: it exits


@dataclasses.dataclass(frozen=True)
class Path:
    """A path's weight: wide bytes (the sum over its instructions), instructions (calls included)."""

    wide: int
    instructions: int
    blocks: tuple[int, ...]

    def better_than(self, other: Path | None) -> bool:
        return other is None or (self.wide, -self.instructions) > (other.wide, -other.instructions)


class Function:
    """The control-flow graph of one function's instructions."""

    def __init__(self, instructions: list[Instruction]) -> None:
        self.instructions = instructions
        self.index = {ins.address: i for i, ins in enumerate(instructions)}
        self._callees: dict[int, int] = {}
        leaders = {0}
        for i, ins in enumerate(instructions):
            if ins.root in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX"):
                leaders.add(i + 1)
            if ins.root in ("BRA", "JMP", "CALL"):
                leaders.add(self.index[ins.target])
        starts = sorted(i for i in leaders if i < len(instructions))
        self.blocks: dict[int, Block] = {}
        for start, end in zip(starts, starts[1:] + [len(instructions)]):
            last = instructions[end - 1]
            successors = []
            if last.root in ("BRX", "JMX"):
                raise ValueError(f"indirect branch: {last}")
            if last.root in ("BRA", "JMP"):
                successors.append(self.index[last.target])
            if last.root not in ("BRA", "JMP", "EXIT", "RET") or last.conditional:
                if end < len(instructions):
                    successors.append(end)
            self.blocks[start] = Block(start, end, successors)

    def _cost(self, block: Block) -> tuple[int, int]:
        """(wide bytes, instructions) of a block, each CALL costing its callee's shortest path."""
        wide = instructions = 0
        for ins in self.instructions[block.start : block.end]:
            wide += ins.wide_bytes
            instructions += 1
            if ins.root == "CALL":
                instructions += self.callee_cost(self.index[ins.target])
        return wide, instructions

    def callee_cost(self, entry: int) -> int:
        """Instructions of a subroutine's shortest path from ``entry`` to a RET."""
        if entry not in self._callees:
            best = self._best(entry, avoid=frozenset(), stop=None, prefer_wide=False)
            self._callees[entry] = best.instructions if best is not None else 0
        return self._callees[entry]

    def back_edges(self) -> set[tuple[int, int]]:
        """(tail, header) of every edge that closes a cycle, by a depth-first walk from the entry."""
        edges, state = set(), {}
        stack = [(0, iter(self.blocks[0].successors))]
        state[0] = "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
            elif state.get(child) == "open":
                edges.add((node, child))
            elif child not in state:
                state[child] = "open"
                stack.append((child, iter(self.blocks[child].successors)))
        return edges

    def _successors(self, node: int, avoid: frozenset) -> list[int]:
        return [child for child in self.blocks[node].successors if (node, child) not in avoid]

    def _best(self, start: int, avoid: frozenset, stop: int | None, prefer_wide: bool = True) -> Path | None:
        """The best path from block ``start`` to an EXIT (or RET), or to block ``stop`` when given (the
        path then ends with that block), never taking an edge in ``avoid``: most wide bytes, then fewest
        instructions (fewest only, with prefer_wide False). Edges that close a cycle are not taken."""
        sink = -1  # ``stop`` reached again: the end of the path
        order, state = [], {start: "open"}
        stack = [(start, iter(self._successors(start, avoid)))]
        while stack:  # depth-first, iterative: paths run through hundreds of blocks
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                order.append(node)
                stack.pop()
            elif child == stop or state.get(child) is not None:
                continue
            else:
                state[child] = "open"
                stack.append((child, iter(self._successors(child, avoid))))
        best: dict[int, Path | None] = {}
        if stop is not None:
            wide, count = self._cost(self.blocks[stop])
            best[sink] = Path(wide if prefer_wide else 0, count, (stop,))
        for node in order:  # children before parents; an edge back to an open node is skipped
            block = self.blocks[node]
            wide, count = self._cost(block)
            wide = wide if prefer_wide else 0
            last = self.instructions[block.end - 1]
            found = Path(wide, count, (node,)) if stop is None and last.root in ("EXIT", "RET") else None
            for child in self._successors(node, avoid):
                rest = best.get(sink if child == stop else child)
                if rest is None:
                    continue
                candidate = Path(wide + rest.wide, count + rest.instructions, (node, *rest.blocks))
                if candidate.better_than(found):
                    found = candidate
            best[node] = found
        return best.get(start)

    def straight(self) -> Path:
        """The steady-state path of a function that handles its elements without iterating (a Triton
        program): entry to EXIT, never taking a loop's back edge (loops there are slow paths, such as
        the reduction of a huge argument of sin and cos)."""
        path = self._best(0, frozenset(self.back_edges()), None)
        if path is None:
            raise ValueError("no path from the entry to an EXIT")
        return path

    def loop(self) -> tuple[Path, Path]:
        """(iteration, overhead) of a function with loops: the heaviest iteration of any loop (the
        path from its header around to its back edge), and the path from the entry into that loop's
        header plus the one from its exit to EXIT (both without iterating)."""
        edges = self.back_edges()
        if not edges:
            raise ValueError("the function has no loop: use straight()")
        avoid = frozenset(edges)
        best_iteration, best_header = None, None
        for tail, header in edges:
            # the iteration: header ... tail, then the back edge; other loops' back edges are not taken
            around = self._best(header, avoid - {(tail, header)}, header)
            if around is None:
                continue
            header_wide, header_count = self._cost(self.blocks[header])  # the path ends with the header again
            iteration = Path(around.wide - header_wide, around.instructions - header_count, around.blocks[:-1])
            if iteration.better_than(best_iteration):
                best_iteration, best_header = iteration, header
        if best_iteration is None:
            raise ValueError("no loop iteration found")
        into = self._best(0, avoid, best_header, prefer_wide=False)
        # leaving: from the loop's header (counted in ``into``), the shortest way out to EXIT without iterating
        out = self._best(best_header, avoid, None, prefer_wide=False)
        header_cost = self._cost(self.blocks[best_header])[1]
        overhead_instructions = (into.instructions if into else 0) + (out.instructions - header_cost if out else 0)
        overhead_blocks = (into.blocks if into else ()) + (out.blocks if out else ())
        return best_iteration, Path(0, overhead_instructions, overhead_blocks)

    def path_instructions(self, path: Path) -> list[Instruction]:
        """The instructions along ``path`` (a CALL's callee not expanded)."""
        out = []
        for start in path.blocks:
            block = self.blocks[start]
            out.extend(self.instructions[block.start : block.end])
        return out


# ---- the report -----------------------------------------------------------------------------------


def classify(instructions: list[Instruction], calls_expanded: Function | None = None) -> dict[str, int]:
    """Instruction counts by class (a CALL's callee counted as "slow path" when a function is given)."""
    counts: dict[str, int] = {}
    for ins in instructions:
        counts[ins.klass] = counts.get(ins.klass, 0) + 1
        if ins.root == "CALL" and calls_expanded is not None:
            counts["slow path"] = counts.get("slow path", 0) + calls_expanded.callee_cost(
                calls_expanded.index[ins.target]
            )
    return counts


def memory_detail(instructions: list[Instruction]) -> dict[str, int]:
    """Counts of the global memory instructions by opcode (``LDG.E.128``, generic ``LD.E``, ...)."""
    counts: dict[str, int] = {}
    for ins in instructions:
        if ins.root in GLOBAL_MEMORY:
            name = ins.opcode
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def report(
    instructions: list[Instruction],
    *,
    elements_per_iteration: int,
    elements_per_thread: int | None = None,
    bytes_per_element: float | None = None,
    loop: bool,
) -> dict:
    """The steady-state report of one function.

    ``loop``: the elements are handled by a loop (CUDA), else by one path (Triton: one block per
    program). ``elements_per_iteration``: elements one thread handles along the path (a loop's
    iteration, or the whole path); ``elements_per_thread``: with a loop, the elements
    one thread handles per launch chunk, over which the way into and out of the loop is amortised.
    ``bytes_per_element``: the bytes the phase moves per element; None: those the path's wide
    accesses move. Returns the fields of the JSON reports (see :func:`fields`).
    """
    function = Function(instructions)
    if loop:
        iteration, overhead = function.loop()
        if elements_per_thread is None:
            raise ValueError("a function with loops needs elements_per_thread")
        path = function.path_instructions(iteration)
        per_element = iteration.instructions / elements_per_iteration + overhead.instructions / elements_per_thread
        counts = classify(path, function)
        extra = classify(function.path_instructions(overhead), function)
        classes = {
            k: counts.get(k, 0) / elements_per_iteration + extra.get(k, 0) / elements_per_thread
            for k in {*counts, *extra}
        }
        wide = iteration.wide
    else:
        whole = function.straight()
        path = function.path_instructions(whole)
        per_element = whole.instructions / elements_per_iteration
        classes = {k: v / elements_per_iteration for k, v in classify(path, function).items()}
        wide = sum(ins.global_bytes for ins in path if ins.global_bytes >= 16)  # not the table's 8-byte reads
    moved = wide / elements_per_iteration
    return fields(per_element, classes, bytes_per_element if bytes_per_element is not None else moved, moved, path)


def fields(per_element: float, classes: dict[str, float], bytes_per_element: float, moved: float, path) -> dict:
    """The report's model fields: instructions and bytes per element, the predicted shares of copy."""
    return {
        "instructions_per_element": round(per_element, 2),
        "classes_per_element": {k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "bytes_per_element": round(bytes_per_element, 3),
        "vector_bytes_per_element": round(moved, 3),
        "memory_instructions": memory_detail(path),
        "pct_copy_predicted": round(predicted_share(per_element, bytes_per_element, CLOCK_BUDGET_GHZ), 1),
        "pct_copy_predicted_boost": round(predicted_share(per_element, bytes_per_element, CLOCK_BOOST_GHZ), 1),
        "instruction_budget_95": round(instruction_budget(bytes_per_element, 95.0), 1),
    }


def breakdown(report_: dict) -> str:
    """One line per class of a report, for a failing test: where the instructions go."""
    classes = ", ".join(f"{k} {v:g}" for k, v in report_["classes_per_element"].items())
    memory = ", ".join(f"{k} x{v}" for k, v in report_["memory_instructions"].items())
    return (
        f"{report_['instructions_per_element']:g} instructions per element ({classes}); "
        f"{report_['bytes_per_element']:g} B per element; budget for 95%: {report_['instruction_budget_95']:g}; "
        f"global accesses on the path: {memory}"
    )


def isclose(a: float, b: float, tol: float = 0.5) -> bool:
    return math.isclose(a, b, abs_tol=tol)
