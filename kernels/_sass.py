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
#: bytes of the vector accesses by their width modifier (what memory_instructions' opcodes end with)
WIDTHS = {"128": 16}

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

    def __init__(self, instructions: list[Instruction], vector_bytes: int = 8) -> None:
        """``vector_bytes``: the narrowest access that counts as a vector (moves several elements)."""
        self.instructions = instructions
        self.vector_bytes = vector_bytes
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
            falls_through = last.root not in ("BRA", "JMP", "EXIT", "RET") or last.conditional
            if falls_through and end < len(instructions) and end not in successors:
                successors.append(end)
            self.blocks[start] = Block(start, end, successors)
        self.predecessors: dict[int, list[int]] = {start: [] for start in self.blocks}
        for start, block in self.blocks.items():
            for child in block.successors:
                self.predecessors[child].append(start)

    def _cost(self, block: Block) -> tuple[int, int]:
        """(wide bytes, instructions) of a block, each CALL costing its callee's shortest path."""
        wide = instructions = 0
        for ins in self.instructions[block.start : block.end]:
            wide += ins.global_bytes if ins.global_bytes >= self.vector_bytes else 0
            instructions += 1
            if ins.root == "CALL":
                instructions += self.callee_cost(self.index[ins.target])
        return wide, instructions

    def callee_cost(self, entry: int) -> int:
        """Instructions of a subroutine's shortest path from ``entry`` to a RET."""
        if entry not in self._callees:
            self._callees[entry] = 0  # a recursive call costs nothing more
            best = self._best(entry, frozenset(self.back_edges()), prefer_wide=False)
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

    def natural_loop(self, tail: int, header: int) -> frozenset[int]:
        """The blocks of the loop that the back edge tail -> header closes: those that reach the tail
        without passing the header."""
        body, stack = {header}, [tail]
        while stack:
            node = stack.pop()
            if node not in body:
                body.add(node)
                stack.extend(self.predecessors[node])
        return frozenset(body)

    def _best(
        self, start: int, avoid: frozenset, stop: int | None = None, within=None, prefer_wide: bool = True
    ) -> Path | None:
        """The best path from block ``start`` to an EXIT (or RET), or to block ``stop`` (the path then
        ends with that block), never taking an edge in ``avoid`` (the back edges: no path iterates) nor
        leaving the blocks ``within`` (when given): most wide bytes, then fewest instructions (fewest
        only, with prefer_wide False)."""

        def successors(node: int) -> list[int]:
            return [
                c for c in self.blocks[node].successors if (node, c) not in avoid and (within is None or c in within)
            ]

        order, state = [], {start: "open"}
        stack = [(start, iter(successors(start)) if start != stop else iter(()))]
        while stack:  # depth-first, iterative: paths run through hundreds of blocks
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                order.append(node)
                stack.pop()
            elif child not in state:
                state[child] = "open"
                stack.append((child, iter(successors(child)) if child != stop else iter(())))
        best: dict[int, Path | None] = {}
        for node in order:  # children before parents (the graph without ``avoid`` has no cycle)
            block = self.blocks[node]
            wide, count = self._cost(block)
            wide = wide if prefer_wide else 0
            last = self.instructions[block.end - 1]
            if node == stop or (stop is None and last.root in ("EXIT", "RET") and not last.conditional):
                best[node] = Path(wide, count, (node,))
                continue
            # a guarded EXIT ends the path here or falls through
            found = Path(wide, count, (node,)) if stop is None and last.root in ("EXIT", "RET") else None
            for child in successors(node):
                rest = best.get(child)
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
        path = self._best(0, frozenset(self.back_edges()))
        if path is None:
            raise ValueError("no path from the entry to an EXIT")
        return path

    def _range(self, block: Block) -> tuple[int, int, int]:
        """(wide bytes at least, at most, instructions) of a block: a guarded access may not run."""
        low = high = 0
        for ins in self.instructions[block.start : block.end]:
            moved = ins.global_bytes if ins.global_bytes >= self.vector_bytes else 0
            high += moved
            low += 0 if ins.conditional else moved
        return low, high, self._cost(block)[1]

    def paths_by_bytes(self, start: int, avoid: frozenset, stop: int, within, unit: int) -> dict[int, Path]:
        """For every whole number of ``unit`` wide bytes that a path from block ``start`` to block
        ``stop`` (inclusive) can move, the one with the fewest instructions; inside ``within``, never
        taking an edge in ``avoid``. A guarded access may or may not run, so a path moves a range of
        bytes; and paths the branches' conditions rule out are among them (the graph does not know that
        two branches test the same flag): the caller picks by the bytes expected. Paths are kept by
        their range of bytes; those that move more than 64 units are dropped."""

        def successors(node: int) -> list[int]:
            return [c for c in self.blocks[node].successors if (node, c) not in avoid and c in within]

        order, state = [], {start}
        stack = [(start, iter(successors(start)) if start != stop else iter(()))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                order.append(node)
                stack.pop()
            elif child not in state:
                state.add(child)
                stack.append((child, iter(successors(child)) if child != stop else iter(())))
        limit = 64 * unit
        table: dict[int, dict[tuple[int, int], Path]] = {}
        for node in order:  # children first
            low, high, count = self._range(self.blocks[node])
            if node == stop:
                table[node] = {(low, high): Path(high, count, (node,))} if low <= limit else {}
                continue
            found: dict[tuple[int, int], Path] = {}
            for child in successors(node):
                for (rest_low, rest_high), rest in table.get(child, {}).items():
                    key = (low + rest_low, high + rest_high)
                    if key[0] <= limit and (key not in found or count + rest.instructions < found[key].instructions):
                        found[key] = Path(key[1], count + rest.instructions, (node, *rest.blocks))
            table[node] = found
        out: dict[int, Path] = {}
        for (low, high), path in table.get(start, {}).items():
            moved = high // unit * unit  # the most whole units in the range
            if moved >= max(low, unit) and (moved not in out or path.instructions < out[moved].instructions):
                out[moved] = Path(moved, path.instructions, path.blocks)
        return out

    def loop(self, unit: int) -> tuple[Path, Path]:
        """(iteration, overhead) of a function whose elements are handled by a loop (a CUDA kernel).

        The iteration: of every loop's paths once around (header to the back edge's tail inside the
        loop), the one that moves the most wide bytes in a whole number of ``unit`` (the bytes of one
        vector of elements in every stream: the paths that move all of the phase's streams), then the
        fewest instructions. The overhead: the fewest instructions from the entry to that loop's
        header, plus from the loop's exit to an EXIT, neither iterating."""
        edges = frozenset(self.back_edges())
        if not edges:
            raise ValueError("the function has no loop: use straight()")
        best_iteration, best_loop = None, None
        for tail, header in sorted(edges):
            body = self.natural_loop(tail, header)
            for around in self.paths_by_bytes(header, edges, tail, body, unit).values():
                if around.better_than(best_iteration):
                    best_iteration, best_loop = around, (header, body)
        if best_iteration is None:
            raise ValueError(f"no loop moves a multiple of {unit} B of vectors per iteration")
        header, body = best_loop
        into = self._best(0, edges, stop=header, prefer_wide=False)
        header_cost = self._cost(self.blocks[header])[1]
        outs = [
            self._best(child, edges, prefer_wide=False)
            for node in body
            for child in self.blocks[node].successors
            if child not in body
        ]
        out = min((o for o in outs if o is not None), key=lambda p: p.instructions, default=None)
        instructions = (into.instructions - header_cost if into else 0) + (out.instructions if out else 0)
        blocks = (into.blocks[:-1] if into else ()) + (out.blocks if out else ())
        return best_iteration, Path(0, instructions, blocks)

    def path_instructions(self, path: Path) -> list[Instruction]:
        """The instructions along ``path`` (a CALL's callee not expanded)."""
        out = []
        for start in path.blocks:
            block = self.blocks[start]
            out.extend(self.instructions[block.start : block.end])
        return out


# ---- the bytes each phase must move ---------------------------------------------------------------

#: Per phase, the streams a steady-state element reads and writes (docs/triton.md, "Bytes per
#: parameter"): P a parameter-dtype stream, S a state-dtype one, R bSAM's stored state (the state
#: dtype, or bfloat16). The kernels compiled: bsam_perturb accumulating (a later sub-batch), fold_grads
#: a middle sub-batch, sam_sq_norm not adaptive (CUDA: adaptive, its heaviest path; ``ADAPTIVE``),
#: ivon_accumulate a middle sample with Price's estimator, ivon_update summed over samples.
STREAMS = {
    "bsam_sample": ("SR", "P"),
    "bsam_perturb": ("PSRS", "PSP"),
    "bsam_update": ("PSRRS", "RSRPP"),
    "find_nonfinite": ("P", ""),
    "fold_grads": ("PS", "SP"),
    "restore": ("S", "P"),
    "sam_sq_norm": ("P", ""),
    "sam_perturb": ("PS", "PP"),
    "sam_update_sgd": ("PSS", "SSPP"),
    "sam_update_adamw": ("PSSS", "SSSPP"),
    "ivon_accumulate": ("PSS", "SSP"),  # a middle sample: g and both sums read, both sums written, g zeroed
    "ivon_update": ("PSRRS", "RSRPP"),  # summed over samples: as bsam_update
}
#: the streams of IVON's update with one sample (Price's estimator from the regenerated noise): no curvature sum
ONE_SAMPLE_STREAMS = {"ivon_update": ("PSRR", "RSRPP")}
#: streams the CUDA kernels add where one kernel serves variants the Triton kernels compile apart
CUDA_EXTRA = {"sam_sq_norm": ("S", "")}  # the weights of the adaptive norm
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def phase_bytes(
    phase: str, param: str, state: str, stored: str | None = None, extra: tuple = ("", ""), one_sample: bool = False
) -> int:
    """Bytes per element the phase moves: its STREAMS (ONE_SAMPLE_STREAMS for ``one_sample``; and ``extra``
    ones) in the given dtypes."""
    reads, writes = (ONE_SAMPLE_STREAMS if one_sample else STREAMS)[phase]
    sizes = {"P": DTYPE_BYTES[param], "S": DTYPE_BYTES[state], "R": DTYPE_BYTES[stored or state]}
    return sum(sizes[kind] for kind in reads + writes + extra[0] + extra[1])


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
            counts[ins.opcode] = counts.get(ins.opcode, 0) + 1
    return dict(sorted(counts.items()))


def report_straight(instructions: list[Instruction], *, elements_per_thread: int, bytes_per_element: float) -> dict:
    """The report of a function that handles ``elements_per_thread`` elements per thread along one path
    (a Triton program: its block over its threads), moving ``bytes_per_element`` (:func:`phase_bytes`)."""
    function = Function(instructions)
    whole = function.straight()
    path = function.path_instructions(whole)
    classes = {k: v / elements_per_thread for k, v in classify(path, function).items()}
    report = fields(whole.instructions / elements_per_thread, classes, bytes_per_element, path)
    report["elements_per_iteration"] = elements_per_thread
    return report


def report_loop(
    instructions: list[Instruction],
    *,
    elements_per_thread: int,
    bytes_per_element: float,
    vector: int,
    vector_bytes: int,
) -> dict:
    """The report of a function whose elements are handled by a loop (a CUDA kernel): one iteration of
    its vector loop (:meth:`Function.loop`) per ``elements_per_iteration`` elements, inferred from the
    wide bytes the iteration moves over ``bytes_per_element`` (every stream in vectors; a multiple of
    ``vector``, the elements of one vector access), plus the way into and out of the loop per
    ``elements_per_thread`` (the elements one thread handles per launch chunk). ``vector_bytes``: the
    narrowest vector access (``vector`` elements of the narrowest stream): the element-by-element loops
    move no vector bytes, so the vector loop is the one that moves the most."""
    function = Function(instructions, vector_bytes)
    iteration, overhead = function.loop(round(vector * bytes_per_element))
    elements = round(iteration.wide / bytes_per_element)
    path = function.path_instructions(iteration)
    counts = classify(path, function)
    extra = classify(function.path_instructions(overhead), function)
    classes = {k: counts.get(k, 0) / elements + extra.get(k, 0) / elements_per_thread for k in {*counts, *extra}}
    per_element = iteration.instructions / elements + overhead.instructions / elements_per_thread
    report = fields(per_element, classes, bytes_per_element, path)
    report["elements_per_iteration"] = elements
    return report


def fields(per_element: float, classes: dict[str, float], bytes_per_element: float, path) -> dict:
    """The report's model fields: instructions and bytes per element, the predicted shares of copy."""
    return {
        "instructions_per_element": round(per_element, 2),
        "classes_per_element": {k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))},
        "bytes_per_element": bytes_per_element,
        "memory_instructions": memory_detail(path),
        "pct_copy_predicted": round(predicted_share(per_element, bytes_per_element, CLOCK_BUDGET_GHZ), 1),
        "pct_copy_predicted_boost": round(predicted_share(per_element, bytes_per_element, CLOCK_BOOST_GHZ), 1),
        "instruction_budget_95": round(instruction_budget(bytes_per_element, 95.0), 1),
    }


def breakdown(report_: dict) -> str:
    """One line per report, for a failing test: where the instructions go."""
    classes = ", ".join(f"{k} {v:g}" for k, v in report_["classes_per_element"].items())
    memory = ", ".join(f"{k} x{v}" for k, v in report_["memory_instructions"].items())
    return (
        f"{report_['instructions_per_element']:g} instructions per element ({classes}); "
        f"{report_['bytes_per_element']:g} B per element; budget for 95%: {report_['instruction_budget_95']:g}; "
        f"global accesses on the path: {memory}"
    )


# ---- the tables of the docs ------------------------------------------------------------------------

#: the parameter dtypes the budget holds (tests/budget.py) and the docs list
HELD_PARAMS = ("fp32", "bf16")
DOCS = {"triton": "triton.md", "cuda": "cext.md"}
_BEGIN = "<!-- sass-report {tier}: generated by python -m sambayes.kernels._sass_docs docs; do not edit -->"
_END = "<!-- /sass-report -->"


def held(reports: list[dict]) -> list[dict]:
    """The reports of the kernels the budget holds: a phase's, float32 or bfloat16 parameters."""
    return [r for r in reports if r.get("phase") and r.get("param") in HELD_PARAMS and "pct_copy_predicted" in r]


def variant(report: dict) -> str:
    """``fp32``, ``bf16, stored bf16``, ``fp32, capturable``, ``fp32, one sample`` (IVON's update),
    ``fp32, gradsq`` (IVON's accumulation): which compilation of a phase's kernel."""
    parts = [report["param"]]
    if report.get("stored"):
        parts.append(f"stored {report['stored']}")
    if report.get("capturable"):
        parts.append("capturable")
    if report.get("one_sample"):
        parts.append("one sample")
    if report.get("gradsq"):
        parts.append("gradsq")
    return ", ".join(parts)


def markdown_table(reports: list[dict], toolchain: str) -> str:
    """The docs table of the held reports: instructions per element (the top classes), registers, bytes
    per element and the predicted share of an H100 copy at both clocks."""
    lines = [
        (
            f"Steady-state path per element, sm_90, {toolchain}; predicted share of an H100 copy at "
            f"{CLOCK_BUDGET_GHZ} / {CLOCK_BOOST_GHZ} GHz (docs/performance.md):"
        ),
        "",
        "| kernel | params | instr/el | largest classes | registers | B/el | % of copy |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    order = {name: i for i, name in enumerate(STREAMS)}
    for r in sorted(held(reports), key=lambda r: (order.get(r["phase"], 99), variant(r))):
        top = ", ".join(f"{k} {v:g}" for k, v in list(r["classes_per_element"].items())[:3])
        lines.append(
            f"| {r['phase']} | {variant(r)} | {r['instructions_per_element']:g} | {top} | {r['registers']} | "
            f"{r['bytes_per_element']:g} | {r['pct_copy_predicted']:g} / {r['pct_copy_predicted_boost']:g} |"
        )
    return "\n".join(lines)


def docs_block(text: str, tier: str) -> str | None:
    """The generated block of ``tier`` in a docs page's text (markers excluded), None where it has none."""
    begin = _BEGIN.format(tier=tier)
    if begin not in text or _END not in text.split(begin, 1)[1]:
        return None
    return text.split(begin, 1)[1].split(_END, 1)[0].strip("\n")


def with_docs_block(text: str, tier: str, table: str) -> str:
    """``text`` with the generated block of ``tier`` replaced by ``table``."""
    begin = _BEGIN.format(tier=tier)
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + table + "\n" + _END + rest.split(_END, 1)[1]
