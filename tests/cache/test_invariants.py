"""Random request lifecycles over a 12-block pool, with a simulated KV store.

Each KV slot records the token prefix it was computed for, so the machine checks not only the
bookkeeping (reference counts, free list, locks) but that every block the cache hands out or
keeps holds the KV of exactly the tokens it claims.
"""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reprise.cache import CacheManager, Match, SeqCache
from reprise.cache.layout import CacheLayout, LayerKind

NUM_BLOCKS, BS = 12, 4
TOKENS = st.integers(1, 2)   # a tiny alphabet, so prefixes collide often
SALTS = st.sampled_from([None, None, "a"])


@dataclass
class Run:
    seq: SeqCache
    token_ids: list[int]               # prompt, then sampled tokens
    num_computed: int                  # tokens whose KV is in the seq's blocks
    copy: tuple[int, int] | None       # partial-block copy the runner has not executed yet


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.cache = CacheManager(NUM_BLOCKS, BS, max_pinned_fraction=0.5, clock=lambda: self.now)
        self.kv: list[list[tuple[int, ...] | None]] = [[None] * BS for _ in range(NUM_BLOCKS)]
        self.runs: list[Run] = []
        self.seen: list[tuple[int, ...]] = []   # token ids of every request so far

    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=16), salt=SALTS, chunk=st.integers(0, 8))
    def add(self, prompt: list[int], salt: str | None, chunk: int) -> None:
        self._admit(prompt, salt, chunk)

    @precondition(lambda self: self.seen)
    @rule(data=st.data(), cut=st.integers(0, 20), suffix=st.lists(TOKENS, max_size=6), salt=SALTS,
          chunk=st.integers(0, 8))
    def add_related(self, data: st.DataObject, cut: int, suffix: list[int], salt: str | None, chunk: int) -> None:
        """A repeat, a next turn or a sibling of an earlier (or running) request."""
        earlier = data.draw(st.sampled_from(self.seen))
        prompt = list(earlier[:cut]) + suffix
        if prompt:
            self._admit(prompt, salt, chunk)

    def _admit(self, prompt: list[int], salt: str | None, chunk: int) -> None:
        """match + acquire, then blocks for a first chunk, as the scheduler admits a request."""
        self.seen.append(tuple(prompt))
        match = self.cache.match(prompt, salt)
        assert match.cached_tokens == self._expected_match(prompt[:-1], salt)
        self._check_match_kv(match, prompt)
        acquired = self.cache.acquire(match, salt)
        if acquired is not None:
            seq, copy = acquired
            if self.cache.allocate(seq, match.cached_tokens + chunk):
                self.runs.append(Run(seq, list(prompt), match.cached_tokens, copy))
            else:
                self.cache.release(seq, [])   # it does not fit: back to waiting, copy never ran
        self._wipe_free_blocks()

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), chunk=st.integers(1, 16), token=TOKENS, commit=st.booleans())
    def step(self, data: st.DataObject, chunk: int, token: int, commit: bool) -> None:
        run = data.draw(st.sampled_from(self.runs))
        if self._advance(run, chunk, token) and commit:
            self.cache.commit(run.seq, run.token_ids[:run.num_computed])
        self._wipe_free_blocks()

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), token=TOKENS, pin=st.integers(0, 16), ttl=st.sampled_from([1.0, 10.0]))
    def finish(self, data: st.DataObject, token: int, pin: int, ttl: float) -> None:
        """Run to the end of what it has (if blocks allow), sample once, release (with a pin)."""
        run = data.draw(st.sampled_from(self.runs))
        self._advance(run, len(run.token_ids), token)
        self._release(run, ((pin, ttl),) if pin else ())

    @rule(seconds=st.sampled_from([0.5, 5.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self._release(data.draw(st.sampled_from(self.runs)))   # maybe before its copy ran

    @rule(num_blocks=st.integers(1, NUM_BLOCKS))
    def evict(self, num_blocks: int) -> None:
        self.cache.evict(num_blocks)
        self._wipe_free_blocks()

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.cache.check_invariants()
        stats = self.cache.stats
        assert stats.blocks_used + stats.blocks_cached + stats.blocks_free == NUM_BLOCKS

    @invariant()
    def nothing_running_is_freed(self) -> None:
        free = set(self.cache.pool.free_block_ids())
        for run in self.runs:
            assert free.isdisjoint(run.seq.block_table)

    @invariant()
    def running_blocks_hold_their_tokens(self) -> None:
        for run in self.runs:
            first = run.seq.cached_tokens if run.copy is not None else 0
            for position in range(first, run.num_computed):
                block = run.seq.block_table[position // BS]
                assert self.kv[block][position % BS] == tuple(run.token_ids[:position + 1])

    @invariant()
    def cached_blocks_hold_their_paths(self) -> None:
        for node in self.cache.index.nodes():
            path = _path_tokens(node)
            for offset, block in enumerate(node.blocks):
                index = node.start // BS + offset
                for position in range(index * BS, min(node.end, (index + 1) * BS)):
                    assert self.kv[block][position % BS] == path[:position + 1]

    def teardown(self) -> None:
        for run in list(self.runs):
            self._release(run)
        stats = self.cache.stats
        assert stats.blocks_used == 0 and stats.blocks_free + stats.blocks_cached == NUM_BLOCKS
        self.cache.evict(NUM_BLOCKS)
        assert self.cache.stats.blocks_free == NUM_BLOCKS and self.cache.index.num_nodes == 0
        self.cache.check_invariants()

    # ---- the simulated runner ---------------------------------------------------------

    def _advance(self, run: Run, chunk: int, token: int) -> bool:
        """Compute up to `chunk` more tokens, sampling one if that reaches the end."""
        self._execute_copy(run)
        end = min(len(run.token_ids), run.num_computed + chunk)
        if not self.cache.allocate(run.seq, end):
            return False
        for position in range(run.num_computed, end):
            block = run.seq.block_table[position // BS]
            self._check_writable(block, position)
            self.kv[block][position % BS] = tuple(run.token_ids[:position + 1])
        run.num_computed = end
        if end == len(run.token_ids):
            run.token_ids.append(token)          # sampled; its KV comes with the next step
        return True

    def _check_writable(self, block: int, position: int) -> None:
        assert self.cache.pool.ref_count(block) == 1, "writing into a shared block"

    def _release(self, run: Run, pins=()) -> None:
        self.cache.release(run.seq, run.token_ids[:run.num_computed], pins)
        self.seen.append(tuple(run.token_ids))
        self.runs.remove(run)
        self._wipe_free_blocks()

    def _execute_copy(self, run: Run) -> None:
        if run.copy is not None:
            source, destination = run.copy
            self.kv[destination] = list(self.kv[source])
            run.copy = None

    def _wipe_free_blocks(self) -> None:
        # A freed block's contents are garbage to whoever allocates it next.
        for block in self.cache.pool.free_block_ids():
            self.kv[block] = [None] * BS

    def _check_match_kv(self, match: Match, prompt: list[int]) -> None:
        for index, block in enumerate(match.blocks):
            for position in range(index * BS, (index + 1) * BS):
                assert self.kv[block][position % BS] == tuple(prompt[:position + 1])
        if match.partial is not None:
            start = len(match.blocks) * BS
            assert match.partial.num_tokens == match.cached_tokens - start
            for position in range(start, match.cached_tokens):
                assert self.kv[match.partial.block][position % BS] == tuple(prompt[:position + 1])

    def _expected_match(self, query: list[int], salt: str | None) -> int:
        """Brute force over every cached path: the longest common prefix with `query`."""
        best = 0
        for node in self.cache.index.nodes():
            if node.salt == salt:
                path = _path_tokens(node)
                best = max(best, next((i for i, (a, b) in enumerate(zip(path, query)) if a != b),
                                      min(len(path), len(query))))
        return best


def _path_tokens(node) -> tuple[int, ...]:
    parts = []
    while node.parent is not None:
        parts.append(node.tokens)
        node = node.parent
    return tuple(token for part in reversed(parts) for token in part)


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_cache_state_machine = CacheMachine.TestCase


class HybridCacheMachine(CacheMachine):
    """The same lifecycles for a layout with recurrent layers and only 3 state slots, so
    checkpoints are dropped often. A simulated state store records, per slot, the tokens its
    state has consumed: every match must end exactly at a checkpoint whose state is its prefix."""

    def __init__(self) -> None:
        super().__init__()
        layout = CacheLayout((LayerKind.RECURRENT, LayerKind.FULL))
        self.cache = CacheManager(NUM_BLOCKS, BS, layout=layout, num_state_slots=NUM_SLOTS)
        self.states: list[tuple[int, ...] | None] = [None] * NUM_SLOTS
        self.restores: dict[int, tuple[int, int]] = {}   # id(seq) -> (checkpoint, working slot), not yet run

    def _admit(self, prompt: list[int], salt: str | None, chunk: int) -> None:
        match = self.cache.match(prompt, salt)
        if match.checkpoint is not None:
            assert self.states[match.checkpoint] == tuple(prompt[:match.cached_tokens])
        num_runs = len(self.runs)
        super()._admit(prompt, salt, chunk)
        if len(self.runs) > num_runs:
            seq = self.runs[-1].seq
            self.states[seq.state_slot] = () if seq.restore_from is None else None   # garbage until restored
            if seq.restore_from is not None:
                self.restores[id(seq)] = (seq.restore_from, seq.state_slot)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), chunk=st.integers(1, 16), token=TOKENS)
    def step_with_checkpoint(self, data: st.DataObject, chunk: int, token: int) -> None:
        """A prefill chunk that ends at a checkpoint position: snapshot, then commit with it."""
        run = data.draw(st.sampled_from(self.runs))
        if self._advance(run, chunk, token):
            slot = self.cache.allocate_checkpoint()
            if slot is not None:
                self.states[slot] = tuple(run.token_ids[:run.num_computed])
            self.cache.commit(run.seq, run.token_ids[:run.num_computed], checkpoint=slot)
        self._wipe_free_blocks()

    @invariant()
    def checkpoints_hold_their_prefixes(self) -> None:
        for node in self.cache.index.nodes():
            path = _path_tokens(node)
            for position, slot in node.checkpoints.items():
                assert self.states[slot] == path[:position]

    def _advance(self, run: Run, chunk: int, token: int) -> bool:
        restore = self.restores.pop(id(run.seq), None)
        if restore is not None:                        # the runner copies before the forward
            self.states[restore[1]] = self.states[restore[0]]
            self.cache.restored(run.seq)
        advanced = super()._advance(run, chunk, token)
        if advanced:
            self.states[run.seq.state_slot] = tuple(run.token_ids[:run.num_computed])
        return advanced

    def _check_writable(self, block: int, position: int) -> None:
        """A checkpoint commit indexes a partial last block while its owner still fills it: only
        slots at or past every index entry's end may be written."""
        for node in self.cache.index.nodes():
            if block in node.blocks:
                assert node.end <= position, f"writing position {position} of {node}"

    def _release(self, run: Run, pins=()) -> None:
        self.restores.pop(id(run.seq), None)
        super()._release(run, pins)

    def _wipe_free_blocks(self) -> None:
        super()._wipe_free_blocks()
        for slot in self.cache.states.free_block_ids():
            self.states[slot] = None

    def _expected_match(self, query: list[int], salt: str | None) -> int:
        """Brute force: the longest checkpoint position whose path is a prefix of `query`."""
        best = 0
        for node in self.cache.index.nodes():
            if node.salt == salt:
                path = _path_tokens(node)
                for position in node.checkpoints:
                    if path[:position] == tuple(query[:position]):
                        best = max(best, position)
        return best


NUM_SLOTS = 3
HybridCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_hybrid_cache_state_machine = HybridCacheMachine.TestCase
