"""Ranking evaluation: constrained beam search over candidates and the whole catalogue must
rank exactly as exhaustive teacher-forced scoring does, on real SeqIO eval examples."""
import jax
import numpy as np
import pytest
from flax.core import meta

from gensar_jax import ranking
from gensar_jax import metrics as metrics_lib
from gensar_jax.identifiers.table import load_identifier_table
from gensar_jax.models.encoder_decoder import build_model
from gensar_jax.models.t5_config import T5Config
from task_world import NUM_ITEMS, NUM_NEGATIVES, build_world

TINY = T5Config(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2,
                num_decoder_layers=2)
INPUT_LENGTH = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  world = build_world(tmp_path_factory.mktemp("eval_world"), prefix="ev")
  reg = world["reg"]
  model = build_model(reg.vocabulary, TINY)
  variables = model.get_initial_variables(
      jax.random.PRNGKey(3), {"encoder_input_tokens": (2, INPUT_LENGTH),
                              "decoder_input_tokens": (2, 6)})
  params = meta.unbox(variables["params"])
  table = load_identifier_table(world["dual"])
  item_ids = [str(i) for i in world["items"]["item_id"]]
  indices = ranking.ranking_indices(table, reg.vocabulary, item_ids, reg.rec_space,
                                       reg.search_space)
  return world, model, params, indices


_SCORERS = {}


def _score(model):
  if model not in _SCORERS:
    _SCORERS[model] = jax.jit(model.score_batch)
  return _SCORERS[model]


def exhaustive_order(model, params, inputs, rows, index):
  """Catalogue rows sorted by teacher-forced log-prob of their identifier, best first."""
  targets = index.tokens[rows]                                       # [n, L]
  batch = {"encoder_input_tokens": np.repeat(inputs[None], len(rows), axis=0),
           "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": np.ones_like(targets, np.float32)}
  scores = np.asarray(_score(model)(params, batch))
  order = np.argsort(-scores, kind="stable")
  return np.asarray(rows)[order], scores[order]


@pytest.mark.parametrize("key", ["rec", "search"])
def test_beam_ranking_equals_exhaustive_scoring(setup, key):
  world, model, params, indices = setup
  index = indices[key]
  task = world["reg"].tasks[{"rec": "next_rec_item", "search": "next_search_item"}[key]]
  result = ranking.evaluate_ranking_task(
      model, params, task, "validation", index, INPUT_LENGTH, batch_size=4,
      num_beams=NUM_NEGATIVES + 1, catalogue=True, catalogue_beams=NUM_ITEMS, progress=False)
  batches = list(ranking.eval_batches(task, "validation", INPUT_LENGTH, 4, index))
  examples = [(b.encoder_input_tokens[i], b.candidate_rows[i], b.target_rows[i])
              for b in batches for i in np.flatnonzero(b.valid)]
  assert result.num_examples == len(examples) == len(result.predictions) > 0
  ranks = []
  for (inputs, cand_rows, target), pred in zip(examples, result.predictions):
    assert pred["target"] == index.item_ids[target]
    order, _ = exhaustive_order(model, params, inputs, cand_rows, index)
    # Every candidate comes back (beams == candidates), in exhaustive order, nothing else.
    assert pred["candidates"] == [index.item_ids[r] for r in order]
    full, _ = exhaustive_order(model, params, inputs, np.arange(NUM_ITEMS), index)
    assert pred["catalogue"] == [index.item_ids[r] for r in full]
    ranks.append(list(order).index(target))
  expected = metrics_lib.ranking_metrics(np.asarray(ranks))
  assert result.candidates == pytest.approx(expected)


def test_small_beam_returns_only_own_candidates(setup):
  world, model, params, indices = setup
  index = indices["search"]
  task = world["reg"].tasks["next_search_item"]
  result = ranking.evaluate_ranking_task(
      model, params, task, "test", index, INPUT_LENGTH, batch_size=3, num_beams=3,
      catalogue=False, progress=False)
  batches = list(ranking.eval_batches(task, "test", INPUT_LENGTH, 3, index))
  own = [set(index.item_ids[r] for r in b.candidate_rows[i])
         for b in batches for i in np.flatnonzero(b.valid)]
  for pred, allowed in zip(result.predictions, own):
    assert len(pred["candidates"]) == 3 == len(set(pred["candidates"]))
    assert set(pred["candidates"]) <= allowed
  assert result.catalogue is None


def test_identifier_tokens_reject_a_foreign_catalogue(setup):
  world, _, _, _ = setup
  table = load_identifier_table(world["dual"])
  with pytest.raises(ValueError, match="no identifier"):
    ranking.IdentifierTokens(table, world["reg"].vocabulary, "sid", "<src_item>",
                                ["I00", "not-an-item"])


def test_max_examples_scores_a_seeded_random_sample_of_users(setup):
  """A bounded evaluation samples users (the same ones for both tasks), not the first N of
  a split written in user order."""
  import seqio
  world, _, _, indices = setup
  reg = world["reg"]
  rec, search = (seqio.get_mixture_or_task(reg.tasks[k])
                 for k in ("next_rec_item", "next_search_item"))
  all_users = sorted({ex["user_id"] for ex in rec.source.get_dataset(
      "validation", shuffle=False).as_numpy_iterator()})
  assert len(all_users) == 10
  picks = {seed: ranking.sampled_users(rec, "validation", 4, seed) for seed in range(6)}
  assert all(len(p) == 4 and set(p) <= set(all_users) for p in picks.values())
  assert len({tuple(p) for p in picks.values()}) > 1          # the seed matters
  assert any(p != all_users[:4] for p in picks.values())      # not simply the first users
  assert ranking.sampled_users(search, "validation", 4, 0) == picks[0]
  assert ranking.sampled_users(rec, "validation", 10, 0) is None  # all of them: no sample
  batches = list(ranking.eval_batches(reg.tasks["next_rec_item"], "validation",
                                         INPUT_LENGTH, 8, indices["rec"], max_examples=4,
                                         sample_seed=0))
  assert sum(int(b.valid.sum()) for b in batches) == 4
