"""CVSE's transductive completion of test concept labels: hand-worked neighbours, image windows and both dataset
rules, and equality with a transcription of CVSE's own code (BruceW91/CVSE `evaluation.py`, `util/utils.py`)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from itm.evaluate.completion import (
    COCO_RULE,
    FLICKR30K_RULE,
    CompletionRule,
    ConceptCompletion,
    image_windows,
    rule_for,
    text_neighbours,
    window_scores,
)


def _at_angles(*degrees: float) -> Tensor:
    """Unit vectors in the plane at these angles: the cosine of two is the cosine of their angle difference."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def _ranked(n: int) -> Tensor:
    """One image ranking captions 0, 1, ..., n - 1 in that order (and so the best image of every caption)."""
    return torch.linspace(1.0, 0.1, n)[None, :]


# --- text neighbours -------------------------------------------------------------------------------------------------


def test_text_neighbours_leave_the_caption_out() -> None:
    """c0 (1, 0), c1 (0.8, 0.6), c2 (0.6, 0.8), c3 (0, 1). Cosines: c0·c1 0.8, c0·c2 0.6, c0·c3 0, c1·c2 0.96,
    c1·c3 0.6, c2·c3 0.8; each caption's own 1 is set to 0, so the two nearest are the two best other captions."""
    vectors = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    assert text_neighbours(vectors, 2) == [[1, 2], [2, 0], [1, 3], [2, 1]]


def test_text_neighbours_count_the_caption_as_zero() -> None:
    """CVSE zeroes the self-similarity rather than removing it: c0 (1, 0), c1 (-1, 0), c2 (0.6, 0.8) have cosines
    c0·c1 -1, c0·c2 0.6, c1·c2 -0.6. c0: 0.6 (c2), then itself (0) before -1 (c1); c1: itself (0) before c2 (-0.6)
    and c0 (-1); c2: c0 (0.6), then itself (0) before c1 (-0.6)."""
    vectors = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    assert text_neighbours(vectors, 2) == [[2, 0], [1, 2], [0, 2]]


# --- image windows ---------------------------------------------------------------------------------------------------


def test_windows_of_three_at_every_place() -> None:
    """One image ranks 6 captions 0..5, so caption p sits at place p; n - K = 3. K = 3: p ≤ 1 takes the first 3
    ([0, 1, 2]); p = 2 takes [p - 1, p + 2) = [1, 2, 3]; p ≥ 3 takes the last 3, [3, 4, 5], even for p = 3, whose
    centred window would be [2, 3, 4]. K < 3 takes the first K until p ≥ n - K, then the last K."""
    scores = _ranked(6)
    assert image_windows(scores, 3) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [3, 4, 5], [3, 4, 5], [3, 4, 5]]
    assert image_windows(scores, 2) == [[0, 1]] * 4 + [[4, 5]] * 2
    assert image_windows(scores, 1) == [[0]] * 5 + [[5]]


def test_wider_windows_follow_cvse_and_stay_inside() -> None:
    """K = 4 over 8 captions (interval 2, n - K = 4): [p - 2, p + 2) for p = 2, 3 ([0..3], [1..4]), the last 4 for
    p ≥ 4. K = 5 over 10 (n - K = 5): [p - 3, p + 2) for p = 3, 4 ([0..4], [1..5]), the last 5 for p ≥ 5. Where that
    slice would start before the ranking (K = 4: p ≤ 1; K = 5: p ≤ 2) CVSE crashes; here it is the first K."""
    assert image_windows(_ranked(8), 4) == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4]] + [[4, 5, 6, 7]] * 4
    assert image_windows(_ranked(10), 5) == [[0, 1, 2, 3, 4]] * 4 + [[1, 2, 3, 4, 5]] + [[5, 6, 7, 8, 9]] * 5
    with pytest.raises(ValueError):  # numpy cannot broadcast CVSE's empty slice into the K-wide row
        cvse_construct_n_with_knn(_ranked(8).numpy().astype(np.float64), K_neigs=4)


# --- the two rules on one example ------------------------------------------------------------------------------------

# Image 0 scores captions 0..5 as 0.9 0.8 0.7 0.1 0.2 0.3 and ranks them 0, 1, 2, 5, 4, 3; image 1 is the mirror,
# ranking 3, 4, 5, 2, 1, 0. Captions 0-2 are best matched by image 0 (places 0, 1, 2), captions 3-5 by image 1
# (places 0, 1, 2). Windows of 3 (n - K = 3): [0, 1, 2], [0, 1, 2], [1, 2, 5] and [3, 4, 5], [3, 4, 5], [4, 5, 2].
SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
WINDOWS = [[0, 1, 2], [0, 1, 2], [1, 2, 5], [3, 4, 5], [3, 4, 5], [4, 5, 2]]
# Captions at 0°, 10°, 25°, 90°, 80°, 60°; the 3 nearest others by angle difference: c0 c1 10°, c2 25°, c5 60°;
# c1 c0 10°, c2 15°, c5 50°; c2 c1 15°, c0 25°, c5 35°; c3 c4 10°, c5 30°, c2 65°; c4 c3 10°, c5 20°, c2 55°;
# c5 c4 20°, c3 30°, c2 35°.
VECTORS = _at_angles(0, 10, 25, 90, 80, 60)
TEXT = [[1, 2, 5], [0, 2, 5], [1, 0, 5], [4, 5, 2], [3, 5, 2], [4, 3, 2]]
# Text neighbours in the window: [1, 2], [0, 2], [1, 5], [4, 5], [3, 5], [4, 2], fewer than 3 each, so every
# caption takes its dataset's rule. Caption i's own concept is 10 + i.
LABELS = [[10], [11], [12], [13], [14], [15]]


def test_example_windows_and_text_neighbours() -> None:
    assert image_windows(SCORES, 3) == WINDOWS
    assert text_neighbours(VECTORS, 3) == TEXT


def test_flickr30k_rule_takes_three_text_neighbours_and_the_window() -> None:
    """a[:3] + b[:4]: c0 [1, 2, 5] + [0, 1, 2], ...; completed = own ∪ neighbours' concepts, so concept 15 reaches
    captions 0-2 (through c5 in their text neighbours) and concept 12 reaches captions 3-5."""
    completion = ConceptCompletion(text_neighbours=3, image_window=3, rule=FLICKR30K_RULE)
    assert completion.neighbours(SCORES, VECTORS) == [
        [1, 2, 5, 0, 1, 2],
        [0, 2, 5, 0, 1, 2],
        [1, 0, 5, 1, 2, 5],
        [4, 5, 2, 3, 4, 5],
        [3, 5, 2, 3, 4, 5],
        [4, 3, 2, 4, 5, 2],
    ]
    assert completion.complete(SCORES, VECTORS, LABELS) == [[10, 11, 12, 15]] * 3 + [[12, 13, 14, 15]] * 3


def test_coco_rule_takes_two_text_neighbours_and_the_window_s_first() -> None:
    """a[:2] + b[:1]: c0 [1, 2] + [0], c1 [0, 2] + [0], c2 [1, 0] + [1], c3 [4, 5] + [3], c4 [3, 5] + [3],
    c5 [4, 3] + [4]; the groups {0, 1, 2} and {3, 4, 5} stay apart."""
    completion = ConceptCompletion(text_neighbours=3, image_window=3, rule=COCO_RULE)
    assert completion.neighbours(SCORES, VECTORS) == [[1, 2, 0], [0, 2, 0], [1, 0, 1], [4, 5, 3], [3, 5, 3], [4, 3, 4]]
    assert completion.complete(SCORES, VECTORS, LABELS) == [[10, 11, 12]] * 3 + [[13, 14, 15]] * 3


def test_three_shared_neighbours_are_kept_whatever_the_rule() -> None:
    """One image ranks 8 captions 0..7; windows of 4: c2 (place 2) [0, 1, 2, 3], c3 [1, 2, 3, 4], c5 (p ≥ n - K)
    [4, 5, 6, 7]. Captions at 0°, 12°, 22°, 35°, 46°, 62°, 75°, 90°; the 3 nearest others: c2 c1 10°, c3 13°,
    c0 22°; c3 c4 11°, c2 13°, c1 23°; c5 c6 13°, c4 16°, c3 27°. c2 and c3 share all three with their window and
    keep them; c5 shares [6, 4] and takes the rule: [6, 4, 3] + [4, 5, 6, 7] or [6, 4] + [4]."""
    scores, vectors = _ranked(8), _at_angles(0, 12, 22, 35, 46, 62, 75, 90)
    for rule, fifth in ((FLICKR30K_RULE, [6, 4, 3, 4, 5, 6, 7]), (COCO_RULE, [6, 4, 4])):
        chosen = ConceptCompletion(text_neighbours=3, image_window=4, rule=rule).neighbours(scores, vectors)
        assert (chosen[2], chosen[3], chosen[5]) == ([1, 3, 0], [4, 2, 1], fifth)


def test_rule_follows_the_dataset_kind() -> None:
    assert rule_for("flickr30k") == rule_for("synthetic") == FLICKR30K_RULE == CompletionRule("flickr30k", 3, 4)
    assert rule_for("coco") == COCO_RULE == CompletionRule("coco", 2, 1)
    with pytest.raises(ValueError, match=r"'imagenet'.*coco"):
        rule_for("imagenet")


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="5 labels for 6 captions"):
        ConceptCompletion().complete(SCORES, VECTORS, LABELS[:5])
    with pytest.raises(ValueError, match="5 caption vectors for 6 captions"):
        ConceptCompletion().neighbours(SCORES, VECTORS[:5])


# --- against CVSE's code ---------------------------------------------------------------------------------------------
# A direct transcription of BruceW91/CVSE (HEAD 94c2191): util/utils.py `Cos_dis` and
# `construct_H_with_KNN_from_distance` (return_index=True, reached through `construct_H_with_KNN`), evaluation.py
# `calculate_sim`, `construct_N_with_KNN`, `label_complete` (its K = 10 and K = 3 made arguments) and the label
# loop of `encode_data_KNN_rerank`. Statements and local names as in CVSE; functions prefixed `cvse_`, lower-cased.


def cvse_cos_dis(x: Tensor) -> Tensor:
    dist_mat = x.mm(x.t())  # cosine_sim(x, x)
    dist_mat = torch.max(dist_mat, dist_mat.t())
    return dist_mat


def cvse_construct_h_with_knn_from_distance(dis_mat: Tensor, k_neig: int) -> Tensor:
    n_obj = dis_mat.shape[0]
    index_K_neighbour = torch.zeros((n_obj, k_neig))  # noqa: N806 (CVSE's names, here and below)
    for center_idx in range(n_obj):
        dis_mat[center_idx, center_idx] = 0
        dis_vec = dis_mat[center_idx]
        _, nearest_idx = torch.sort(dis_vec, -1, descending=True)  # from large to small (2. for cosine dist)
        index_K_neighbour[center_idx] = nearest_idx[:k_neig]
    return index_K_neighbour


def cvse_calculate_sim(img_emb: np.ndarray, cap_emb: np.ndarray) -> np.ndarray:
    mat_sim = np.dot(img_emb, cap_emb.T)
    image_num = img_emb.shape[0] // 5
    mat_sim_2 = np.zeros((image_num, image_num * 5))  # (N(image), 5N(caption))
    for index in range(image_num):
        sim_line = mat_sim[index * 5]
        mat_sim_2[index] = sim_line
    return mat_sim_2


def cvse_construct_n_with_knn(mat_sim_inst: np.ndarray, K_neigs: int = 3) -> np.ndarray:  # noqa: N803
    order_t2i = np.argsort(-mat_sim_inst, 0)
    order_i2t = np.argsort(-mat_sim_inst, 1)
    index_N_neighbours = np.zeros((mat_sim_inst.shape[1], K_neigs))  # noqa: N806
    interval = int(K_neigs / 2)
    for i in range(mat_sim_inst.shape[1]):
        ind_nearest_t2i = order_t2i[0, i]
        cand_nearest_i2t = order_i2t[ind_nearest_t2i]
        index_i_txt = np.where(cand_nearest_i2t == i)
        index_i_txt = index_i_txt[0][0]
        if index_i_txt < cand_nearest_i2t.shape[0] - K_neigs:
            if K_neigs == 3 and index_i_txt > 1:
                index_N_neighbours[i] = cand_nearest_i2t[index_i_txt - 1 : index_i_txt + 2]
            elif K_neigs > 3 and K_neigs % 2 == 0:
                index_N_neighbours[i] = cand_nearest_i2t[index_i_txt - interval : index_i_txt + interval]
            elif K_neigs > 3 and K_neigs % 2 != 0:
                index_N_neighbours[i] = cand_nearest_i2t[index_i_txt - interval - 1 : index_i_txt + interval]
            else:
                index_N_neighbours[i] = cand_nearest_i2t[:K_neigs]
        else:
            index_N_neighbours[i] = cand_nearest_i2t[-K_neigs:]
    return index_N_neighbours


def cvse_label_complete(
    img_embs: np.ndarray, cap_embs: np.ndarray, data_name: str, text_k: int = 10, window_k: int = 3
) -> list[list[int]]:
    cap_embs_t = torch.Tensor(cap_embs)
    index_K_neighbour_t2t = cvse_construct_h_with_knn_from_distance(cvse_cos_dis(cap_embs_t), text_k)  # noqa: N806
    cap_embs = cap_embs_t.numpy()
    mat_sim_inst = cvse_calculate_sim(img_embs, cap_embs)
    index_K_neighbour_i2t = cvse_construct_n_with_knn(mat_sim_inst, K_neigs=window_k)  # noqa: N806
    ind_cap_complete = []
    for i in range(len(index_K_neighbour_t2t)):
        a = index_K_neighbour_t2t[i]
        a = [int(elem) for elem in a]
        b = index_K_neighbour_i2t[i]
        b = [int(elem) for elem in b]
        tmp = [val for val in a if val in b]
        if len(tmp) < 3 or tmp == []:
            if "f30k" in data_name or "f30k" == data_name:  # noqa: SIM300
                tmp = a[:3] + b[:4]
            elif "coco" in data_name or "coco" == data_name:  # noqa: SIM300
                tmp = a[:2] + b[:1]
        ind_cap_complete.append(tmp)
    return ind_cap_complete


def cvse_complete_labels(index_KNN_neighbour: list[list[int]], concept_labels: np.ndarray) -> np.ndarray:  # noqa: N803
    Complete_labels = copy.deepcopy(concept_labels)  # noqa: N806 (CVSE's name)
    for j in range(concept_labels.shape[0]):  # ids[j] = j: the whole split in one batch
        neighhbour_index = index_KNN_neighbour[j]
        neighhbour_index.append(j)
        K_neighbour_labels = concept_labels[neighhbour_index]  # noqa: N806
        Complete_labels[j] = K_neighbour_labels.max(axis=0)
    return Complete_labels


@pytest.mark.parametrize(
    ("data_name", "rule"), [("f30k_precomp", FLICKR30K_RULE), ("coco_precomp", COCO_RULE)], ids=["f30k", "coco"]
)
@pytest.mark.parametrize(
    ("n_images", "dim", "text_k", "window_k", "noise"),
    [(40, 16, 10, 3, 0.8), (40, 16, 4, 2, 0.8), (30, 8, 10, 1, 1.5), (3, 4, 10, 3, 3.0), (2, 2, 6, 3, 5.0),
     (220, 32, 10, 3, 0.8)],
)  # fmt: skip
def test_equals_cvse_on_random_embeddings(
    data_name: str, rule: CompletionRule, n_images: int, dim: int, text_k: int, window_k: int, noise: float
) -> None:
    """Seeded fused embeddings, 5 captions per image (each its image's vector plus noise, so captions fall at every
    place of their best image's ranking), random concept labels: the same neighbour lists and completed labels as
    CVSE. In the two smallest galleries some captions have fewer than `text_k` positive cosines, so they are their
    own text neighbours and share 3 with their window, and some sit at the end of their best image's ranking; the
    largest (1,100 captions) spans two blocks of the caption-caption similarity."""
    generator = np.random.default_rng(n_images * 100 + text_k)
    images = generator.standard_normal((n_images, dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions = np.repeat(images, 5, axis=0) + noise * generator.standard_normal((5 * n_images, dim))
    captions = (captions / np.linalg.norm(captions, axis=1, keepdims=True)).astype(np.float32)
    images = images.astype(np.float32)
    multi_hot = (generator.random((5 * n_images, 12)) < 0.15).astype(np.float64)
    labels = [np.flatnonzero(row).tolist() for row in multi_hot]

    # CVSE keeps one image row per caption (5 copies of each image), in float64
    expected = cvse_label_complete(np.repeat(images, 5, axis=0).astype(np.float64), captions, data_name,
                                   text_k=text_k, window_k=window_k)  # fmt: skip
    expected_labels = cvse_complete_labels(copy.deepcopy(expected), multi_hot)

    completion = ConceptCompletion(text_neighbours=text_k, image_window=window_k, rule=rule)
    image_vectors, caption_vectors = torch.from_numpy(images), torch.from_numpy(captions)
    scores = window_scores(image_vectors, caption_vectors)
    assert completion.neighbours(scores, caption_vectors) == expected
    completed = completion.complete(scores, caption_vectors, labels)
    assert completed == [np.flatnonzero(row).tolist() for row in expected_labels]
