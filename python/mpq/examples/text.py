"""A real transformer for Linear-layer quantization: all-MiniLM-L6-v2 as a sentence embedder.

``SentenceEmbedder`` wraps the BERT encoder so that its input is one plain tensor of token ids
and its output the sentence embedding (mean of the token states over the non-padding tokens,
L2-normalised), as sentence-transformers computes it. Calibration batches are then ordinary
tensors, and the model traces with ``torch.jit.trace``.

``SENTENCES`` is a fixed set of 64 varied English sentences; ``calibration_sentences()`` (the
even-numbered ones) calibrate, ``evaluation_sentences()`` (the odd-numbered ones) evaluate.
``embedding_fidelity`` compares embeddings by cosine similarity, the measure the model is used with.

NB: calibration sees every token row of a Linear layer's input, padding tokens included (their
states never reach the embedding: the attention mask hides them as keys and the pooling skips
them). ``calibration_batches`` therefore batches sentences of equal length, without padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SENTENCES",
    "SentenceEmbedder",
    "calibration_sentences",
    "evaluation_sentences",
    "tokenize",
    "calibration_batches",
    "embedding_fidelity",
]


class SentenceEmbedder(nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings of a BERT-style encoder.

    Args:
        encoder: a ``transformers`` encoder (e.g. ``BertModel``) called as
            ``encoder(input_ids=..., attention_mask=...)``, whose first output is the token states.
        pad_token_id: the tokenizer's padding id; tokens equal to it are masked out.

    forward(input_ids (LongTensor[N, L])) -> Tensor[N, hidden] float32, rows of unit L2 norm.
    """

    def __init__(self, encoder: nn.Module, pad_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_token_id
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long())[0]  # [N, L, hidden]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 256) -> torch.Tensor:
    """Token ids of ``texts``, padded to the longest: LongTensor[len(texts), L]. 256 tokens at
    most, as sentence-transformers truncates all-MiniLM-L6-v2's input."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")[
        "input_ids"
    ]


def calibration_batches(tokenizer, texts: Sequence[str]) -> list[torch.Tensor]:
    """The texts' token ids grouped by length, one batch [n, L] per length (shortest first), so
    that no padding token enters the calibration statistics."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for t in texts:
        ids = tokenize(tokenizer, [t])
        by_length.setdefault(ids.shape[1], []).append(ids)
    return [torch.cat(by_length[n]) for n in sorted(by_length)]


def embedding_fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of each embedding [N, D] to its reference [N, D]: mean and minimum."""
    cos = F.cosine_similarity(embeddings.double(), reference.double(), dim=1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def calibration_sentences() -> list[str]:
    return list(SENTENCES[0::2])


def evaluation_sentences() -> list[str]:
    return list(SENTENCES[1::2])


# Varied topics, lengths and registers; written for this project.
SENTENCES = (
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose again this quarter, and mortgage applications fell sharply.",
    "Please remember to water the tomatoes before you leave for the airport.",
    "The committee postponed its vote until the full budget report is available.",
    "A sudden thunderstorm flooded the underground station during the evening rush hour.",
    "She learned to play the cello at the age of forty and now performs in a local orchestra.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "How many kilometres is it from Lisbon to Madrid by train?",
    "The new smartphone has a larger battery but a slower processor than last year's model.",
    "He apologised for the delay and promised the parcel would arrive on Friday.",
    "Mount Everest is the highest mountain above sea level, on the border of Nepal and China.",
    "Our team fixed the memory leak by releasing the buffers after each request.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Children in the village walk three miles to school every morning.",
    "The museum's new exhibition features paintings by early Impressionist artists.",
    "If the server does not respond within ten seconds, the client retries the request.",
    "Rising sea levels threaten coastal cities around the world.",
    "The goalkeeper saved a penalty in the final minute to win the championship.",
    "I can't find my keys anywhere; did you see them on the kitchen table?",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "Regular exercise and a balanced diet lower the risk of heart disease.",
    "The stock market closed higher after the central bank's announcement.",
    "Our flight was cancelled, so we spent the night in a small hotel near the airport.",
    "The novel tells the story of two sisters separated during the war.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "Turn left at the bakery and the library will be on your right.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Vaccines train the immune system to recognise a virus without causing the disease.",
    "The startup raised twelve million dollars to expand its delivery service.",
    "A gentle breeze carried the smell of pine trees across the lake.",
    "The software update improves battery life and fixes several security vulnerabilities.",
    "My grandmother tells the best stories about growing up on a farm.",
    "Bees play an essential role in pollinating crops and wild plants.",
    "The judge ruled that the evidence had been collected illegally.",
    "Can you recommend a good restaurant for a birthday dinner?",
    "The telescope captured images of a galaxy billions of light years away.",
    "Heavy snow closed the mountain pass for the rest of the week.",
    "The students presented their robotics project to a panel of engineers.",
    "Coffee prices have doubled because of poor harvests in Brazil.",
    "The dog barked loudly at the mail carrier every single morning.",
    "Electric cars produce no tailpipe emissions, but their batteries require rare metals.",
    "The city council approved plans for a new park along the river.",
    "He practised the piano for hours before the competition.",
    "Machine learning models can reflect the biases present in their training data.",
    "The volcano erupted without warning, covering nearby towns in ash.",
    "We watched the sunset from the top of the hill, wrapped in blankets.",
    "The company announced layoffs after a disappointing year of sales.",
    "Reading before bed helps many people fall asleep faster.",
    "The bridge was closed for repairs after inspectors found cracks in its supports.",
    "Dolphins communicate using a complex system of clicks and whistles.",
    "Please send me the slides from yesterday's meeting.",
    "The festival attracts thousands of visitors every summer.",
    "A balanced budget requires either higher taxes or lower spending.",
    "The chef prepared a five-course meal using only local ingredients.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The train was delayed by forty minutes because of a signal failure.",
    "She painted the walls of her bedroom a pale shade of blue.",
    "The law requires all new buildings to meet strict energy efficiency standards.",
    "Learning a second language improves memory and concentration.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Cybercriminals stole millions of passwords in the data breach.",
    "The marathon route passes through the historic centre of the city.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Thank you for your patience while we resolve this issue.",
)
