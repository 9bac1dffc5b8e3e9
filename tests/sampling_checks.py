"""What the speculative-sampling tests of the package's GPT and of acnify'd Hugging Face LMs share: the
full model's exact distribution of the first two new tokens, and the bound sampled frequencies must
keep to it."""
import torch

from acn_kernels.speculative import distribution


def exact_pairs(last_logits, prompt: torch.Tensor, temperature: float, top_k) -> torch.Tensor:
    """(vocab, vocab): the probability of each first and second new token after `prompt` (1, positions),
    from last_logits(tokens) -> (batch, vocab), the full model's logits after each row of tokens."""
    with torch.no_grad():
        first = distribution(last_logits(prompt)[0], temperature, top_k)
        grown = torch.cat([prompt.expand(len(first), -1), torch.arange(len(first))[:, None]], 1)
        second = distribution(last_logits(grown), temperature, top_k)
    return first[:, None] * second


def assert_pair_frequencies(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """The frequencies of the last two tokens of every row within 4.5 standard deviations per cell
    (and 1e-3) of `expected`."""
    samples, vocab = tokens.shape[0], expected.shape[0]
    counts = torch.zeros(vocab, vocab)
    counts.index_put_((tokens[:, -2], tokens[:, -1]), torch.ones(samples), accumulate=True)
    bound = 4.5 * (expected * (1 - expected) / samples).sqrt() + 1e-3
    assert ((counts / samples - expected).abs() <= bound).all(), (counts / samples - expected)
