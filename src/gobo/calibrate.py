"""Data-free sensitivity: how much each weight tensor's quantization error reaches the output.

No dataset is read. The inputs are synthetic sentences drawn from the tokenizer alone:
WordPiece and BPE vocabularies list their tokens roughly by corpus frequency after the
special and single-character entries, so token ids sampled with a Zipf law over the rank
from the first common word ("the") give sequences whose token statistics resemble text
(frequent function words, a long tail), which random uniform ids do not.

For one tensor, :class:`OutputSensitivity` puts its quantized version in the model, runs
the synthetic batch and measures the relative squared error of the last hidden state
(real tokens only). Divided by the tensor's own relative weight error this is a gain:
how strongly that tensor's error is amplified (or damped) on its way to the output.
:class:`JacobianSensitivity` estimates the same error to first order for every tensor from
one forward and a few backward passes, without the noise of one particular rounding. The
size-aware allocation treats every tensor alike; the sensitivity-aware one weighs each
tensor's error by its gain, which moves bits from tensors whose errors vanish (attention
keys and queries, an unused pooler) to those whose errors reach the embedding (values,
feed-forward layers).
"""

from __future__ import annotations

from typing import Collection

import numpy as np

__all__ = ["JacobianSensitivity", "OutputSensitivity", "match_output_means", "synthetic_batch"]

#: Zipf exponent of the token-rank law (about 1 for natural text)
ZIPF_EXPONENT = 1.0
#: JacobianSensitivity with ``rows`` and one direction for all sentences (``batch`` 0): the
#: sentences go through this many at a time, shortest first, each pass cut to the positions its
#: own sentences fill, and the sums are taken over all their tokens together, as one pass
#: would take them (all-mpnet-base-v2's 16 sentences: 488 positions instead of 624)
JOINT_CHUNK = 8


def _first_common_word(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    for t in ("the", "\u0120the", "\u2581the", "▁the", "Ġthe"):
        if t in vocab:
            return int(vocab[t])
    special = set(tokenizer.all_special_ids)
    return next(i for i in range(len(tokenizer)) if i not in special)


#: punctuation of the ``punctuation=True`` sentences: after each word, a comma, a hyphen,
#: an "'s" or a full stop with these probabilities (roughly their rates in English prose, a
#: fixed prior, not measured on any corpus); each sentence then ends with "." (85%), "!" or "?"
PUNCTUATION = ((",", 0.05), ("-", 0.01), ("'s", 0.015), (".", 0.01))
FULL_STOP = 0.85


def _punctuation_ids(tokenizer) -> dict[str, int] | None:
    """Ids of the single tokens ".", ",", "-", "'", "s", "!" and "?", or None if the
    vocabulary lacks one of them."""
    vocab = tokenizer.get_vocab()
    ids = {t: vocab.get(t) for t in (".", ",", "-", "'", "s", "!", "?")}
    return None if any(v is None for v in ids.values()) else {t: int(v) for t, v in ids.items()}


def synthetic_batch(tokenizer, n_seqs: int = 8, max_len: int = 32, seed: int = 0, punctuation: bool = False):
    """``(input_ids, attention_mask)`` of ``n_seqs`` synthetic sentences, lengths from 8 to
    ``max_len`` tokens with the tokenizer's start and end tokens; deterministic in ``seed``.

    With ``punctuation`` the words (as many as those lengths leave room for) are followed by
    punctuation drawn by :data:`PUNCTUATION` and an end mark, so a sentence may run past
    ``max_len`` (to 128 tokens at most). Real text is full of these tokens ("." and "," are
    among the most frequent), and the word ranks of a vocabulary leave them out; a model's
    inputs on such sentences are measurably closer to its inputs on text (the layers' output
    error under the error feedback of :mod:`gobo.feedback`, weighted by real inputs, fell by
    8% on all-mpnet-base-v2). A vocabulary without these tokens gets the words alone.
    """
    import torch

    rng = np.random.default_rng(seed)
    start = _first_common_word(tokenizer)
    n_words = len(tokenizer) - start
    p = 1.0 / (np.arange(n_words) + 2.0) ** ZIPF_EXPONENT
    p /= p.sum()
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    punct = _punctuation_ids(tokenizer) if punctuation else None
    seqs = []
    if punct is None:
        for n in rng.integers(min(8, max_len), max_len + 1, n_seqs):
            seqs.append([cls_id, *(start + rng.choice(n_words, n - 2, p=p)), sep_id])
    else:
        marks, bounds = [], np.cumsum([q for _, q in PUNCTUATION])
        for t, _ in PUNCTUATION:
            marks.append([punct["'"], punct["s"]] if t == "'s" else [punct[t]])
        for _ in range(n_seqs):
            words = start + rng.choice(n_words, int(rng.integers(min(8, max_len) - 2, max_len - 1)), p=p)
            out: list[int] = []
            for w in words:
                out.append(int(w))
                k = int(np.searchsorted(bounds, rng.random(), side="right"))
                if k < len(marks):
                    out.extend(marks[k])
            out.append(punct["."] if rng.random() < FULL_STOP else int(rng.choice([punct["!"], punct["?"]])))
            seqs.append([cls_id, *out[:126], sep_id])
    # the words alone keep their fixed width; punctuated sentences are padded to the longest
    width = max_len if punct is None else max(len(s) for s in seqs)
    ids = np.full((n_seqs, width), pad_id, dtype=np.int64)
    mask = np.zeros((n_seqs, width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class OutputSensitivity:
    """Relative output error of a model when one weight tensor is replaced.

    ``model`` is the FP32 source (left unchanged after every call); ``__call__(name, w)``
    returns ``|h' - h|^2 / |h|^2`` over the real tokens of the synthetic batch, where ``h``
    is the last hidden state and ``h'`` the same with parameter ``name`` set to ``w``.
    """

    def __init__(self, model, tokenizer, n_seqs: int = 8, max_len: int = 32, seed: int = 0, punctuation: bool = False) -> None:
        import torch

        self.model = model
        self.params = dict(model.named_parameters())
        self.ids, self.mask = synthetic_batch(tokenizer, n_seqs, max_len, seed, punctuation=punctuation)
        self.layers, self.outputs = _layer_stack(model), []
        hooks = [layer.register_forward_hook(lambda mod, inp, out: self.outputs.append(out)) for _, layer in self.layers]
        try:
            self.ref = self._hidden()
        finally:
            for h in hooks:
                h.remove()
        if len(self.outputs) != len(self.layers):  # a layer ran more or less than once (shared layers): no skipping
            self.layers, self.outputs = [], []
        self.energy = float(torch.sum(self.ref.double() ** 2))

    def _first_layer(self, name: str) -> int:
        """Index of the encoder layer that parameter ``name`` belongs to (0: none, or the first)."""
        return next((i for i, (prefix, _) in enumerate(self.layers) if name.startswith(prefix)), 0)

    def _hidden(self):
        import torch

        with torch.inference_mode():
            h = self.model(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
        return h[self.mask.bool()]

    def __call__(self, name: str, weight: np.ndarray) -> float:
        import torch

        p = self.params[name]
        keep = p.detach().clone()
        skipped = [layer for _, layer in self.layers[: self._first_layer(name)]]
        try:
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).reshape(p.shape))
            # the layers before the tensor's own compute what they did in the reference pass: they
            # give back its outputs instead (the same values, so the same error, in less time)
            for layer, out in zip(skipped, self.outputs):
                layer.forward = lambda *a, _out=out, **k: _out
            err = float(torch.sum((self._hidden() - self.ref).double() ** 2))
        finally:
            for layer in skipped:
                del layer.forward
            with torch.no_grad():
                p.copy_(keep)
        return err / max(self.energy, 1e-300)


class JacobianSensitivity:
    """The first-order estimate of :class:`OutputSensitivity`, for every tensor from one pass.

    For a small change ``d`` of a weight tensor the last hidden state moves by ``J d``
    (``J`` the Jacobian of the hidden state with respect to the tensor), and for errors that
    are independent across weights ``E |J d|^2 = sum_i d_i^2 |J_i|^2`` (``J_i`` the column of
    weight ``i``). For a random output direction ``v`` with independent standard normal
    entries the gradient of ``v . h`` is ``J^T v``, and ``E (J^T v)_i^2 = |J_i|^2`` exactly
    (Hutchinson's identity), so ``probes`` backward passes give every weight's ``|J_i|^2``
    for every tensor at once. ``__call__(name, w)`` then returns ``sum_i (w_i - w0_i)^2
    |J_i|^2 / |h|^2`` for the synthetic batch (real tokens only): one forward and
    ``probes`` backward passes in all, where :class:`OutputSensitivity` runs the model once
    per tensor. ``model`` is left unchanged. ``names``: the tensors to measure (None: every
    weight of two or more dimensions); the others get no gradient. 2 ``probes`` (the
    default) put each tensor's gain within a few percent of what more would give
    (:attr:`gobo.config.GoboConfig.sensitivity_probes`).

    The same passes give ``output_moments[name]`` for every measured ``nn.Embedding`` table
    whose output has a vector per token: ``E[g g^T]`` (float32, dim x dim), ``g`` the
    gradient of ``v . h`` at the table's output for a real token, over tokens and probes.
    Its ``(j, k)`` entry is, on average over ``v``, the product of the Jacobian columns of
    the looked-up vector's entries ``j`` and ``k``: an error ``e`` in a table's row costs
    ``e^T G e`` at the output wherever the token occurs. For the tables it plays the part
    the input moments play for a Linear in error feedback (``feedback_embeddings``).

    ``batch`` > 0: the sentences go through ``batch`` at a time, shortest first, each pass
    cut to the positions its sentences fill, with directions of their own: each weight's
    ``|J_i|^2`` is then the sum of every pass's squared gradients, as unbiased as the one
    pass's and free of the terms between passes. ``moments``: a
    :class:`gobo.feedback.MomentsRecorder` open on ``model``, which the forward passes feed
    (the feedback's moments from the same passes).

    ``rows``: only each row's sum of ``|J_i|^2`` is kept (:meth:`rows_of`; what expected
    gains read), and an nn.Linear's weight gradient is never formed: with ``X`` its input
    and ``G`` the gradient at its output (real tokens x features, one pass, one direction),
    row ``r`` of the weight gradient is ``G_r^T X``, so its sum of squares is
    ``G_r^T (X X^T) G_r``. The pass's tokens are fewer than a Linear's features, so the
    products over them cost less than the weight gradients (all-mpnet-base-v2, one noisy
    comparison: the gains in 2.1-2.4 s against 2.4-3.4 s; the row sums the same to 5e-5
    relative). With ``batch`` 0 its passes take :data:`JOINT_CHUNK` sentences at a time
    (:meth:`_joint`), and the sums are still those of one pass with one direction: the same
    step factors on both bundled models, seeds 0 to 4, in about a fifth less time.
    Padded positions are left out: the attention mask gives them exactly zero gradient.
    A table looked up once per token sums the gradients at its output by id (no table-sized
    gradient: 94 MB per pass for all-mpnet-base-v2's words); other tables, and a Linear that
    does not read one vector per token once per pass (a pooler), get their gradient as
    before. ``table_moments`` False: no :attr:`output_moments` (none asked for).
    """

    def __init__(self, model, tokenizer, n_seqs: int = 8, max_len: int = 32, seed: int = 0, punctuation: bool = False,
                 probes: int = 2, names: Collection[str] | None = None, batch: int = 0, moments=None,
                 rows: bool = False, table_moments: bool = True) -> None:
        import torch

        ids, mask = synthetic_batch(tokenizer, n_seqs, max_len, seed, punctuation=punctuation)
        keep = None if names is None else set(names)
        params = {n: p for n, p in model.named_parameters() if p.dim() >= 2 and (keep is None or n in keep)}
        self.params = params
        was = {n: p.requires_grad for n, p in params.items()}
        gen = torch.Generator().manual_seed(seed)
        self.column = {}
        self.row = {}
        self.rows_only = rows
        self.energy = 0.0
        mods = dict(model.named_modules())
        linears = {n: mods[n.rsplit(".", 1)[0]] for n in params
                   if rows and isinstance(mods.get(n.rsplit(".", 1)[0]), torch.nn.Linear)}
        seen: dict = {}  # rows: each Linear's (input, output) of the pass, and how often it ran

        def record(mod, inp, out, n):
            seen[n] = (inp[0], out, seen[n][2] + 1 if n in seen else 1)

        hooks = [mod.register_forward_hook(lambda mod, inp, out, n=n: record(mod, inp, out, n))
                 for n, mod in linears.items()]
        tables = {f"{m}.weight": mod for m, mod in model.named_modules()
                  if isinstance(mod, torch.nn.Embedding) and f"{m}.weight" in params}
        looked_up: dict = {}  # each table's output, where it has one vector per token of the batch
        looked_ids: dict = {}  # and the ids it looked up

        def lookup(mod, inp, out, n):
            looked_up[n], looked_ids[n] = out, inp[0]

        hooks += [mod.register_forward_hook(lambda mod, inp, out, n=n: lookup(mod, inp, out, n)) for n, mod in tables.items()]
        sums = {}
        count = 0
        try:
            for p in params.values():
                p.requires_grad_(True)
            if rows and not batch:  # one direction over all the sentences, their passes cut to their tokens
                count = self._joint(model, ids, mask, probes, gen, params, linears, tables, seen, looked_up, looked_ids,
                                    table_moments, moments, sums)
            else:
                for picked, span in _batches(mask, batch):
                    real = mask[picked, span].bool()
                    if moments is not None:  # the feedback's moments, from the same forward pass
                        moments.batch(real)
                    seen.clear()
                    with torch.enable_grad():
                        h = model(input_ids=ids[picked, span], attention_mask=mask[picked, span]).last_hidden_state[real]
                        self.energy += float(torch.sum(h.detach().double() ** 2))
                        outs, per_token, by_id, measured = _roles(params, linears, tables, seen, looked_up, real, rows,
                                                                  table_moments)
                        grams: dict = {}  # X X^T of each input tensor of the pass (query, key and value share one)
                        for i in range(probes):
                            v = torch.randn(h.shape, generator=gen, dtype=h.dtype)
                            grads = torch.autograd.grad(h, [params[n] for n in measured] + [seen[n][1] for n in per_token]
                                                        + [looked_up[n] for n in outs],
                                                        grad_outputs=v, retain_graph=i < probes - 1, allow_unused=True)
                            for n, g in zip(measured, grads):
                                if g is None:
                                    continue
                                if rows:
                                    self._add_row(n, g.detach().square().sum(1, dtype=torch.float64))
                                elif n in self.column:  # squared in place: the gradients are this call's own
                                    self.column[n] += g.detach().square_()
                                else:
                                    self.column[n] = g.detach().square_()
                            for n, g in zip(per_token, grads[len(measured) : len(measured) + len(per_token)]):
                                if g is None:
                                    continue
                                x = seen[n][0]
                                if id(x) not in grams:
                                    xr = x.detach()[real].to(torch.float32)
                                    grams[id(x)] = xr @ xr.T
                                g = g.detach()[real].to(torch.float32)
                                self._add_row(n, ((grams[id(x)] @ g) * g).sum(0, dtype=torch.float64))
                            for n, g in zip(outs, grads[len(measured) + len(per_token):]):
                                if g is None:
                                    continue
                                if n in by_id:
                                    self._add_row(n, _table_rows(tables[n], looked_ids[n], g.detach()))
                                if table_moments:
                                    g = g[real].double()
                                    sums[n] = sums[n] + g.T @ g if n in sums else g.T @ g
                    count += probes * int(real.sum())
        finally:
            for held in (seen, looked_up, looked_ids):  # the pass's tensors, not kept
                held.clear()
            for hook in hooks:
                hook.remove()
            for n, p in params.items():
                p.requires_grad_(was[n])
        for n, p in params.items():  # a tensor no gradient reached has none
            if rows:
                self.row[n] = self.row[n] / probes if n in self.row else torch.zeros(p.shape[0], dtype=torch.float64)
                continue
            if n not in self.column:
                self.column[n] = torch.zeros_like(p)
            self.column[n] /= probes
        self.output_moments = {n: (g / count).to(torch.float32) for n, g in sums.items() if float(g.trace()) > 0}

    def _joint(self, model, ids, mask, probes: int, gen, params, linears, tables, seen, looked_up, looked_ids,
               table_moments: bool, moments, sums) -> int:
        """The ``rows`` sums of one pass over all the sentences with one direction per probe
        (``batch`` 0), from passes over :data:`JOINT_CHUNK` of them at a time: each pass's
        inputs and output gradients are put back in the one pass's token order, and the sums
        are formed from all of them together (``G_r^T (X X^T) G_r`` with ``X`` and ``G`` over
        every token, the table's gradients summed by id over every token, the gradients of
        weights used otherwise summed over the passes before they are squared). The same
        sums, to float32 rounding, without the work spent on padding. Returns the count of
        real tokens times ``probes``."""
        import torch

        real_all = mask.bool()
        total = int(real_all.sum())
        order = torch.full(real_all.shape, -1, dtype=torch.int64)
        order[real_all] = torch.arange(total)  # each real token's row in the one pass's order
        hidden = dirs = None
        xs: dict = {}  # per-token Linears: the input each reads, under the first one's name, all tokens
        first: dict = {}  # each per-token Linear's first reader of its input
        gs: dict = {}  # (probe, name) -> gradient at its output, all tokens
        table_ids: dict = {}  # tables summed by id: the ids looked up, all tokens
        dense: dict = {}  # (probe, name) -> the gradient of a weight used otherwise, summed over passes
        for picked, span in _batches(mask, JOINT_CHUNK):
            real = real_all[picked, span]
            at = order[picked, span][real]
            if moments is not None:
                moments.batch(real)
            seen.clear()
            with torch.enable_grad():
                h = model(input_ids=ids[picked, span], attention_mask=mask[picked, span]).last_hidden_state[real]
                if hidden is None:  # the directions of every probe, drawn as the one pass draws them
                    hidden = torch.empty((total, h.shape[1]), dtype=h.dtype)
                    dirs = [torch.randn(hidden.shape, generator=gen, dtype=h.dtype) for _ in range(probes)]
                hidden[at] = h.detach()
                outs, per_token, by_id, measured = _roles(params, linears, tables, seen, looked_up, real, True,
                                                          table_moments)
                outs = [n for n in outs if n in by_id or table_moments]  # the others' gradients would go unread
                named: dict = {}  # this pass's input tensors, by the first Linear reading each
                for n in per_token:
                    key = named.setdefault(id(seen[n][0]), n)
                    first[n] = key
                    if key == n:
                        xs.setdefault(n, torch.empty((total, seen[n][0].shape[-1]), dtype=torch.float32))[at] = \
                            seen[n][0].detach()[real].to(torch.float32)
                for n in by_id:
                    table_ids.setdefault(n, torch.empty(total, dtype=looked_ids[n].dtype))[at] = looked_ids[n][real]
                for i in range(probes):
                    grads = torch.autograd.grad(h, [params[n] for n in measured] + [seen[n][1] for n in per_token]
                                                + [looked_up[n] for n in outs],
                                                grad_outputs=dirs[i][at], retain_graph=i < probes - 1, allow_unused=True)
                    for n, g in zip(measured, grads):
                        if g is not None:
                            dense[i, n] = dense[i, n] + g.detach() if (i, n) in dense else g.detach()
                    for n, g in zip(per_token + outs, grads[len(measured):]):
                        if g is not None:
                            g = g.detach()[real].to(torch.float32)
                            gs.setdefault((i, n), torch.zeros((total, g.shape[1]), dtype=torch.float32))[at] = g
        for held in (seen, looked_up, looked_ids):
            held.clear()
        if hidden is None:
            return 0
        self.energy += float(torch.sum(hidden.double() ** 2))
        grams = {key: x @ x.T for key, x in xs.items()}
        # each tensor's sums, probe after probe (the first pass put each tensor's probes in order)
        for (_, n), g in dense.items():
            self._add_row(n, g.square().sum(1, dtype=torch.float64))
        for (_, n), g in gs.items():
            if n in first:
                self._add_row(n, ((grams[first[n]] @ g) * g).sum(0, dtype=torch.float64))
                continue
            if n in table_ids:
                self._add_row(n, _table_rows(tables[n], table_ids[n], g))
            if table_moments:
                gd = g.double()
                sums[n] = sums[n] + gd.T @ gd if n in sums else gd.T @ gd
        return probes * total

    def _add_row(self, name: str, s) -> None:
        self.row[name] = self.row[name] + s if name in self.row else s

    def columns_of(self, name: str) -> np.ndarray:
        """``|J_i|^2`` of every weight of tensor ``name`` (float32, the tensor's shape): what
        :meth:`__call__` weighs the squared changes with, for callers that sum them in parts."""
        self._need_columns()
        return self.column[name].numpy()

    def rows_of(self, name: str) -> np.ndarray:
        """Each row's sum of ``|J_i|^2`` over tensor ``name``'s weights (float64; rows as
        :func:`gobo.methods.uniform.as_rows` cuts a tensor, its first dimension)."""
        if self.rows_only:
            return self.row[name].numpy()
        col = self.column[name].numpy()
        return col.reshape(col.shape[0], -1).sum(axis=1, dtype=np.float64)

    def _need_columns(self) -> None:
        if self.rows_only:
            raise ValueError("these gains kept each row's sum of |J_i|^2 alone (rows=True): no weight's own")

    def __call__(self, name: str, weight: np.ndarray) -> float:
        import torch

        self._need_columns()
        p = self.params[name].detach()
        d = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).reshape(p.shape) - p
        return float(torch.sum(d.double() ** 2 * self.column[name].double())) / max(self.energy, 1e-300)


def _roles(params, linears, tables, seen, looked_up, real, rows: bool, table_moments: bool):
    """``(outs, per_token, by_id, measured)`` of a pass of :class:`JacobianSensitivity` over
    the sentences whose real tokens are ``real``: the tables with one output vector per token
    (when their gradients are read), the Linears run once on one vector per token, the tables
    whose rows sum their gradients by id (``rows``), and the weights whose own gradient is
    formed (all others)."""
    outs = [n for n, o in looked_up.items() if tuple(o.shape) == (*real.shape, tables[n].embedding_dim)
            and (rows or table_moments)]
    per_token = [n for n in linears if n in seen and seen[n][2] == 1 and seen[n][0].dim() == 3
                 and tuple(seen[n][0].shape[:2]) == tuple(real.shape)]
    # rows: a table looked up once per token sums the gradients at its output by id
    by_id = [n for n in outs if rows and not tables[n].scale_grad_by_freq]
    measured = [n for n in params if n not in per_token and n not in by_id]
    return outs, per_token, by_id, measured


def _table_rows(table, ids, grad):
    """Each row's sum of squared gradient (float64, the table's rows) of nn.Embedding
    ``table`` looked up at ``ids`` with gradient ``grad`` at its output (ids' shape x dim):
    the gradients of one id summed (in float32, as the table's own gradient sums them), its
    padding row's left at zero (as there), and no table-sized gradient formed."""
    import torch

    flat = ids.reshape(-1)
    uniq, inv = torch.unique(flat, return_inverse=True)
    acc = torch.zeros((len(uniq), grad.shape[-1]), dtype=torch.float32)
    acc.index_add_(0, inv, grad.reshape(-1, grad.shape[-1]).to(torch.float32))
    out = torch.zeros(table.num_embeddings, dtype=torch.float64)
    out[uniq] = acc.square().sum(1, dtype=torch.float64)
    if table.padding_idx is not None:
        out[table.padding_idx] = 0.0
    return out


def _batches(mask, batch: int):
    """``(rows, span)`` of each pass over the sentences of ``mask``: all at once in their
    order (``batch`` 0), or ``batch`` at a time shortest first, each cut to the positions its
    own sentences fill (what their padding would cost otherwise)."""
    import torch

    if not batch:
        return [(torch.arange(mask.shape[0]), slice(0, mask.shape[1]))]
    real = mask.bool()
    order = torch.argsort(real.sum(1), stable=True)
    out = []
    for s in range(0, mask.shape[0], batch):
        rows = order[s : s + batch]
        filled = torch.nonzero(real[rows].any(0)).flatten()
        out.append((rows, slice(int(filled[0]), int(filled[-1]) + 1) if len(filled) else slice(0, 1)))
    return out


def _layer_stack(model) -> list[tuple[str, object]]:
    """``(prefix, module)`` of each layer of the model's main stack (the longest ModuleList
    whose name ends in ``layer``, as BERT, RoBERTa, ELECTRA, MPNet and DistilBERT name it),
    in order, the prefix ending in a dot; [] when there is none or a parameter belongs to two."""
    import torch

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.split(".")[-1] == "layer"]
    if not lists:
        return []
    name, stack = max(lists, key=lambda nm: len(nm[1]))
    owned = [{id(p) for p in layer.parameters()} for layer in stack]
    if sum(len(o) for o in owned) != len(set().union(*owned)):
        return []
    return [(f"{name}.{i}.", layer) for i, layer in enumerate(stack)]


def match_output_means(model, tokenizer, quantized: dict[str, np.ndarray], biases: dict[str, np.ndarray],
                       n_seqs: int = 128, max_len: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """New biases that give every quantized Linear the mean output it had in FP32.

    ``model`` is the FP32 source (restored before returning); ``quantized`` maps parameter
    names to their dequantized weights (Linear and Embedding), ``biases`` the FP32 biases.
    One FP32 pass over the synthetic batch records the mean input ``mu`` of every Linear
    (word tokens only: not padding, nor the start and end tokens). One pass of the quantized model follows, in which each Linear, just
    before it runs, sees its actual input mean ``mu_q`` (which carries every error upstream,
    already corrected there) and gets the bias ``b + W mu - W_q mu_q``: its mean output over
    the batch is then the FP32 one. The data-free bias correction of Nagel et al. (2019)
    uses FP32 means for both terms; taking ``mu_q`` from the quantized network corrects the
    mean shift that accumulates through the layers as well. Linears that never see token
    states (a pooler) keep their bias.
    """
    import torch

    ids, mask = synthetic_batch(tokenizer, n_seqs, max_len, seed)
    # the means leave out each sentence's start and end tokens: some models (all-mpnet-base-v2)
    # give them activations orders of magnitude above the words', which would set every bias
    words = mask.clone()
    words[:, 0] = 0
    words[torch.arange(len(words)), mask.sum(1) - 1] = 0
    m = words.unsqueeze(-1).to(torch.float64)
    count = float(words.sum())
    linears = {n: mod for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and f"{n}.weight" in quantized and f"{n}.bias" in biases}

    def masked_mean(x):
        return (x.to(torch.float64) * m).sum((0, 1)) / count

    means: dict[str, torch.Tensor] = {}

    def record(n):
        def hook(mod, inp):
            if inp[0].dim() == 3:
                means[n] = masked_mean(inp[0])
        return hook

    new: dict[str, np.ndarray] = {}

    def correct(n):
        w = linears[n].weight.detach().to(torch.float64).clone()  # FP32 weight, read before the swap
        b = torch.from_numpy(np.asarray(biases[f"{n}.bias"], dtype=np.float64))
        wq = torch.from_numpy(np.asarray(quantized[f"{n}.weight"], dtype=np.float64)).reshape(w.shape)

        def hook(mod, inp):
            if inp[0].dim() != 3 or n not in means:
                return
            nb = b + w @ means[n] - wq @ masked_mean(inp[0])
            new[f"{n}.bias"] = nb.to(torch.float32).numpy()
            mod.bias.copy_(torch.from_numpy(new[f"{n}.bias"]))
        return hook

    params = dict(model.named_parameters())
    keep = {k: params[k].detach().clone() for k in quantized if k in params}
    keep.update({k: params[k].detach().clone() for k in (f"{n}.bias" for n in linears)})
    handles = []
    try:
        handles = [mod.register_forward_pre_hook(record(n)) for n, mod in linears.items()]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        handles = [mod.register_forward_pre_hook(correct(n)) for n, mod in linears.items()]
        with torch.no_grad():
            for k in keep:
                if k in quantized:
                    params[k].copy_(torch.from_numpy(np.ascontiguousarray(quantized[k], dtype=np.float32)).reshape(params[k].shape))
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, v in keep.items():
                params[k].copy_(v)
    return new
