"""The pretraining data loader: deterministic, exactly resumable, and the same under any ranks x accumulation split.

Pieces, from the bottom up (one module each):

- **seeds**: every RNG is seeded from (seed, names, positions) only; ``step_rng``, ``chunk_seed``.
- **split**: one split's shards (``open_split``: the manifest's token counts, the tokenizer check) and their rows as
  flat id arrays (``RaggedIds``); ``DataError``.
- **streams**: one stream per (kind, key): a ``MonoStream`` per language (shared by MLM and CLM) and a ``ParaStream``
  per pair ``"en-fr"`` (TLM), each an endless seeded walk whose whole state is four ints; the sentence-mode
  ``LengthPool`` on top of a stream.
- **batches**: the ``Batch`` the trainer gets. ``mode="stream"`` (XLM's stream mode): a language's sentences, in
  stream order, are concatenated as ``s1 </s> s2 </s> ...`` and cut into pieces of ``seq_len - 1`` tokens; every block
  is ``<s>`` + one piece, so all blocks are exactly ``seq_len`` long with no padding, and a sentence straddling two
  blocks continues in that language's next block. ``mode="sentence"``: each item is ``<s> sentence </s>`` truncated to
  ``seq_len``; a pool of ``pool_sentences`` consecutive items is sorted by length and cut into batches whose padded
  size (items x longest item) fits ``token_budget``; the batch order inside the pool is shuffled (seeded by the pool's
  start position). TLM items (``batch_size`` pairs in stream mode, budgeted pools in sentence mode) are laid out by
  ``xlm_core.objectives.build_tlm_batch``; each pair's direction is flipped at random by the step's RNG.
- **schedule**: step ``s`` draws its objective (from the objective weights) and its language or pair
  (q_i ∝ p_i^alpha over the train manifest's token counts) from ``np.random.default_rng([seed, s])``: stateless, so
  resuming needs no RNG state and every rank draws the same. A step is one objective x one language/pair, as in XLM.
- **loader**: the global batch of a step is split into ``world_size * accum_steps`` equal, contiguous chunks; chunk
  ``g = micro_step * world_size + rank`` (micro-step major). Every rank advances the streams over the whole global
  batch (cheap integer/array work) and turns only its own chunks into tensors, so 2 ranks x 1 accumulation step see
  exactly the chunks 1 rank x 2 steps sees. Each chunk carries ``chunk_seed(seed, step, g)`` for its masking RNG.
  ``PretrainLoader`` yields, per step, this rank's ``accum_steps`` micro-batches, produced ahead in a background
  thread; each stream also reads its next shard ahead on a small thread pool. ``state_dict()`` is the position after
  the last step handed to the caller (each produced step carries a snapshot), JSON-serialisable. Neither thread
  changes what is produced, only when.
- **eval_batches**: ``iter_eval_batches``, a deterministic pass over a valid/test split, nothing shuffled.

The trainer side, for one rank::

    loader = PretrainLoader("data/shards/train", languages, pairs, {"mlm": 1, "tlm": 0.5}, alpha=0.5, seq_len=256,
                            batch_size=256, seed=1234, rank=rank, world_size=world, accum_steps=accum)
    loader.load_state_dict(checkpoint_meta["loader"])          # on resume
    for micro_batches in loader:                                # one optimizer step
        for mb in micro_batches:
            mb = mb.to(device)
            generator.manual_seed(mb.chunk_seed)                # masks independent of the ranks x accum split
            loss = mlm_loss(model, mb.model_inputs(), masking, generator)
        ...
        meta["loader"] = loader.state_dict()                    # with the checkpoint of this step
"""
from xlm_core.data.batches import Batch, pair_item_length, sentence_item_length
from xlm_core.data.eval_batches import iter_eval_batches
from xlm_core.data.loader import MODES, STATE_VERSION, PretrainLoader
from xlm_core.data.schedule import MONO_OBJECTIVES, OBJECTIVES, StepPlan, StepSchedule, sampling_probs
from xlm_core.data.seeds import chunk_seed, step_rng
from xlm_core.data.split import (DataError, RaggedIds, SplitInfo, concat_with_eos, open_split, read_mono_rows,
                                read_para_rows)
from xlm_core.data.streams import MonoStream, ParaStream

__all__ = ["Batch", "DataError", "MODES", "MONO_OBJECTIVES", "MonoStream", "OBJECTIVES", "ParaStream", "PretrainLoader",
           "RaggedIds", "STATE_VERSION", "SplitInfo", "StepPlan", "StepSchedule", "chunk_seed", "concat_with_eos",
           "iter_eval_batches", "open_split", "pair_item_length", "read_mono_rows", "read_para_rows",
           "sampling_probs", "sentence_item_length", "step_rng"]
