import numpy as np
import torch

from student_train.data import LabelStream, LoaderState, collate, columns_from_rows, open_label_sets


def row_keys(batch):
    """Each row's input ids (without padding), as a hashable key."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    return [tuple(ids[i, : int(attn[i].sum())].tolist()) for i in range(len(ids))]


def all_rows(label_dir):
    from labelgen.shards import ShardReader
    return sorted(tuple(r["input_ids"].tolist()) for r in ShardReader(label_dir).rows(columns=["input_ids"]))


def test_two_ranks_and_two_workers_cover_every_row_exactly_once(topk_labels):
    readers = open_label_sets([str(topk_labels)])
    seen = []
    for rank in range(2):
        stream = LabelStream(readers, batch_size=3, seed=1, rank=rank, world_size=2, max_epochs=1)
        for batch, meta in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2):
            seen += row_keys(batch)
    assert sorted(seen) == all_rows(topk_labels)


def test_epochs_are_shuffled_deterministically_for_seed_and_epoch(topk_labels):
    readers = open_label_sets([str(topk_labels)])
    def order(seed):
        return [k for b, _ in LabelStream(readers, 4, seed=seed, max_epochs=2) for k in row_keys(b)]
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    n = len(all_rows(topk_labels))
    assert a[:n] != a[n:2 * n] and sorted(a[:n]) == sorted(a[n:2 * n])


def test_stopping_mid_epoch_and_resuming_gives_the_same_batches(topk_labels):
    readers = open_label_sets([str(topk_labels)])
    for workers in (0, 2):
        def loader(state=None):
            s = LabelStream(readers, 3, seed=5, group_units=2)
            if state:
                s.load_state_dict(state)
            return iter(torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers))
        straight = [row_keys(b) for b, _ in (next(it) for it in [loader()] for _ in range(40))]
        it, tracker = loader(), LoaderState()
        first = []
        for _ in range(13):
            b, meta = next(it)
            tracker.update(meta)
            first.append(row_keys(b))
        rest = [row_keys(b) for b, _ in (next(it2) for it2 in [loader(tracker.state_dict())] for _ in range(27))]
        assert first + rest == straight, f"num_workers={workers}"


def test_collate_masks_prompt_tokens_of_samples_and_pads_topk():
    rows = [{"prompt_ids": np.array([1, 2, 3]), "completion_ids": np.array([4, 5])},
            {"prompt_ids": np.array([7]), "completion_ids": np.array([8, 9, 10])}]
    b = collate(columns_from_rows(rows), "samples")
    # position t predicts token t+1: row 0's targets 4, 5 sit at positions 2, 3
    assert b["mask"][0].tolist() == [False, False, True, True]
    assert b["mask"][1].tolist() == [True, True, True, False]
    assert b["targets"][0, 2:4].tolist() == [4, 5]
    lp = np.log(np.array([[0.5, 0.2, 0.1]] * 2, dtype=np.float32))
    trow = {"input_ids": np.array([1, 2, 3]), "topk_ids": np.array([[3, 9, 4]] * 2), "topk_logprobs": lp,
            "coverage": np.array([0.8, 0.8], np.float32)}
    t = collate(columns_from_rows([trow]), "topk", k=2, vocab_limit=5)
    assert t["topk_ids"].shape == (1, 2, 2)
    assert abs(t["coverage"][0, 0].item() - 0.7) < 1e-6   # the dropped third entry's mass is taken out
    # id 9 is beyond the student's 5 logits: emptied
    assert t["topk_logprobs"][0, 0, 1].item() == -np.inf and t["topk_ids"][0, 0, 1].item() == 0
