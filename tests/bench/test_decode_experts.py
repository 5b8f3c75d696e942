"""The decode-expert benchmark's formulations compute the same routed experts."""
import jax
import numpy as np
import pytest

from moejax.bench import decode_experts


def test_every_form_equals_the_tile_loop_when_no_expert_overflows():
  layers = decode_experts.make_layers(2, 8, 32, 16)
  x = jax.random.normal(jax.random.key(1), (6, 32))
  # capacity = tokens: an expert gets each token at most once, so the padded forms drop nothing.
  out = {name: np.asarray(decode_experts.run_form(name, 2, 6, 3)(x, layers))
         for name in decode_experts.FORMS}
  assert np.abs(out["tile_loop"] - np.asarray(x)).max() > 1e-2   # the experts changed x
  for name, got in out.items():
    np.testing.assert_allclose(got, out["tile_loop"], rtol=1e-4, atol=1e-4, err_msg=name)


def test_main_prints_a_row_per_form(capsys):
  decode_experts.main(["--tokens", "4", "--experts", "4", "--top_k", "2", "--d_model", "16",
                       "--expert_ff", "8", "--layers", "1", "--capacity", "4", "--steps", "2",
                       "--repeats", "1"])
  rows = [line for line in capsys.readouterr().out.splitlines()
          if line.startswith("| ") and not line.startswith("| form")]
  assert [r.split(" | ")[0][2:] for r in rows] == list(decode_experts.FORMS)


def test_unknown_form_is_an_error():
  with pytest.raises(SystemExit):
    decode_experts.main(["--forms", "tile_loop,nope"])
