"""`reprise bench audit`: its statistics against hand-computed values, and its verdicts against real
reprise servers: a namespace per key (the default) is "not detected" across keys and "detected"
within one key; --shared-cache is "detected" across keys."""
from __future__ import annotations

import json
import math

import pytest

from reprise.bench.audit import audit
from reprise.bench.twosample import ks_test, mann_whitney, median
from reprise.cli import main
from tests.server.helpers import launch

VICTIM, ATTACKER = "audit-victim-key", "audit-attacker-key"
# the default model on this CPU: a 300-word prompt (~310 tokens) prefills in hundreds of ms, a hit in
# tens; the pool holds every prompt of one test (~3 x 10 x 310 tokens), so no planted prompt is evicted
FLAGS = ["--kv-cache-bytes", "512MiB", "--api-key", VICTIM, "--api-key", ATTACKER]
PROBES, WORDS, ALPHA = 10, 300, 0.001


def test_ks_and_mann_whitney_match_hand_computed_values():
    # disjoint samples: D = 1; ne = 9/6, t = (sqrt(1.5) + 0.12 + 0.11/sqrt(1.5)) * 1 = 1.43450
    ks = ks_test([1, 2, 3], [4, 5, 6])
    t = math.sqrt(1.5) + 0.12 + 0.11 / math.sqrt(1.5)
    assert ks.statistic == 1.0
    assert ks.p_value == pytest.approx(2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * t * t) for j in range(1, 5)))
    assert ks.p_value == pytest.approx(0.0326217, abs=1e-7)
    # U = 0, mean 4.5, variance 3*3*7/12 = 5.25, z = (4.5 - 0.5) / sqrt(5.25) = 1.74574: p = 0.0808556 (scipy too)
    mw = mann_whitney([1, 2, 3], [4, 5, 6])
    assert (mw.u, mw.superiority, mw.rank_biserial) == (0.0, 0.0, -1.0)
    assert mw.p_value == pytest.approx(math.erfc(4 / math.sqrt(5.25) / math.sqrt(2)))
    assert mw.p_value == pytest.approx(0.0808556, abs=1e-7)


def test_ties_take_midranks_and_the_tie_correction():
    # combined: 1 | 2 2 2 | 3 3 | 4 | 5 -> x's ranks 1, 3, 3, 5.5: U = 12.5 - 10 = 2.5 (pairs: 0 + .5 + .5 + 1.5)
    mw = mann_whitney([1, 2, 2, 3], [2, 3, 4, 5])
    assert (mw.u, mw.superiority, mw.rank_biserial) == (2.5, 2.5 / 16, 2 * 2.5 / 16 - 1)
    variance = 16 / 12 * (9 - (3 ** 3 - 3 + 2 ** 3 - 2) / (8 * 7))      # 11.285714
    assert mw.p_value == pytest.approx(math.erfc((8 - 2.5 - 0.5) / math.sqrt(variance) / math.sqrt(2)))
    assert ks_test([1, 2, 2, 3], [2, 3, 4, 5]).statistic == 0.5           # at 2: 3/4 - 1/4
    assert mann_whitney([7, 7], [7, 7]).p_value == 1.0
    assert (median([3, 1, 2]), median([4, 1, 3, 2])) == (2, 2.5)


def run_audit(url: str, seed: int) -> dict:
    return audit(url, VICTIM, ATTACKER, num_probes=PROBES, prompt_words=WORDS, alpha=ALPHA, seed=seed)


def test_a_namespace_per_key_is_not_detected_across_keys_and_is_within_one():
    with launch(FLAGS) as running:
        result = run_audit(running.url, seed=1)
    across, within = result["tests"]["across_keys"], result["tests"]["within_one_key"]
    assert (across["detected"], within["detected"]) == (False, True), json.dumps(result, indent=1)
    assert result["cache_shared_across_keys"] == "not detected"
    assert max(across["planted_cached_tokens"], across["fresh_cached_tokens"]) < 30    # the template (24) and
    # now and then a first word that another prompt began with
    assert within["planted_cached_tokens"] > 10 * within["fresh_cached_tokens"]


def test_a_shared_cache_is_detected_across_keys(tmp_path, capsys):
    with launch(FLAGS + ["--shared-cache"]) as running:
        out = tmp_path / "audit.json"
        assert main(["bench", "audit", "--base-url", running.url, "--victim-key", VICTIM, "--attacker-key", ATTACKER,
                     "--probes", str(PROBES), "--prompt-words", str(WORDS), "--alpha", str(ALPHA), "--seed", "2",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tests"]["across_keys"]["detected"] and result["tests"]["within_one_key"]["detected"]
    assert result["cache_shared_across_keys"] == "detected"
    assert "cache shared across keys: detected" in capsys.readouterr().out
