"""Accuracy evidence: a character-level Llama trained in the test on tests/data/corpus.txt
(about a minute of CPU, once per session), quantized by each method; perplexity on the
held-out text (lutflash.accuracy, which benchmarks/bench_accuracy.py shares)."""

import pytest

from lutflash import accuracy


@pytest.fixture(scope="session")
def accuracy_rows():
    result = accuracy.run(accuracy.Setup())
    print("\n" + accuracy.markdown_table(result["rows"]))
    return {row["variant"]: row for row in result["rows"]}


@pytest.mark.slow
def test_trained_model_is_a_language_model(accuracy_rows):
    # a character model that learned the text: far below the uniform guess (vocab ~56)
    assert accuracy_rows["fp32"]["ppl"] < 2.0


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
def test_calibrated_at_least_as_good_as_data_free(accuracy_rows, bits):
    gptq = accuracy_rows[f"{bits}-bit gptq"]["ppl"]
    for data_free in ("rtn", "alternating"):
        assert gptq <= accuracy_rows[f"{bits}-bit {data_free}"]["ppl"], data_free
    if bits == 3:  # and each calibrated variant beats its own data-free quantizer
        assert accuracy_rows["3-bit gptq uniform"]["ppl"] <= accuracy_rows["3-bit rtn"]["ppl"]
        assert accuracy_rows["3-bit rtn + awq"]["ppl"] <= accuracy_rows["3-bit rtn"]["ppl"]
        for data_free in ("rtn", "alternating"):
            assert accuracy_rows["3-bit gptq + awq"]["ppl"] <= accuracy_rows[f"3-bit {data_free}"]["ppl"]


@pytest.mark.slow
def test_4bit_gptq_within_3_percent_of_fp32(accuracy_rows):
    assert accuracy_rows["4-bit gptq"]["gap"] <= 0.03


@pytest.mark.slow
def test_3bit_gptq_gap_at_most_half_of_rtn(accuracy_rows):
    """The issue's target (GPTQ's published ratio on Llama-2-7B is 0.69x, AWQ's 0.65x)."""
    gptq, rtn = accuracy_rows["3-bit gptq"]["gap"], accuracy_rows["3-bit rtn"]["gap"]
    assert rtn > 0 and gptq <= 0.5 * rtn, f"gap ratio {gptq / rtn:.2f}"
