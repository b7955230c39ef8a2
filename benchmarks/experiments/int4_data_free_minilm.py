"""Data-free int4 g128 ideas on all-MiniLM-L6-v2: a fake-quant prototype (issue 8 item 1, 2026-11-24).

Each idea replaces the weights of the 36 encoder linears by their int4_g128_asym dequantization (as
the w4a16 recipe folds them; activations stay fp32) in the eager HF model and compares the sentence
embeddings with fp32 on examples/semantic_search.py's corpus and held-out texts. "search (default)"
reproduces the example's w4a16 row exactly (0.96492 / 0.96625). Results: DESIGN-NOTES.md, "Data-free
int4 at g128: what else was tried".

    python benchmarks/experiments/int4_data_free_minilm.py            # everything (~5 min on 2 cores)
    python benchmarks/experiments/int4_data_free_minilm.py imp bias   # groups: imp awq bias hqq gptq synth combo
"""

import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import semantic_search as S  # noqa: E402
from lowbit_compile import reference  # noqa: E402
from lowbit_compile.weight_search import search_quantize  # noqa: E402

torch.manual_seed(0)
FMT = "int4_g128_asym"
tok, enc = S.load_encoder("cpu")
bert = enc.model
texts = [t for _, t in S.CORPUS] + [t for _, t in S.QUERIES]
inputs = S.encode_inputs(tok, texts, "cpu")
held = S.encode_inputs(tok, [t for _, t in S.HELD_OUT_CORPUS] + [t for _, t in S.HELD_OUT_QUERIES], "cpu")
ND = len(S.CORPUS)
with torch.no_grad():
    REF = enc(*inputs)
    REF_H = enc(*held)
    REF_TOP = S.top_k(REF[ND:], REF[:ND], 3)

L = bert.config.num_hidden_layers
layers = bert.encoder.layer


def linears():
    for i, lay in enumerate(layers):
        a = lay.attention
        yield f"{i}.q", a.self.query
        yield f"{i}.k", a.self.key
        yield f"{i}.v", a.self.value
        yield f"{i}.o", a.output.dense
        yield f"{i}.fi", lay.intermediate.dense
        yield f"{i}.fo", lay.output.dense


LIN = dict(linears())
ORIG = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in LIN.items()}


def evaluate(weights, biases=None):
    """weights: name -> fp32 W to use; biases: name -> bias (default original)."""
    with torch.no_grad():
        for n, m in LIN.items():
            m.weight.copy_(weights.get(n, ORIG[n][0]))
            m.bias.copy_((biases or {}).get(n, ORIG[n][1]))
        e = enc(*inputs)
        h = enc(*held)
        for n, m in LIN.items():
            m.weight.copy_(ORIG[n][0])
            m.bias.copy_(ORIG[n][1])
    cos = S.cosine_rows(e[:ND], REF[:ND])
    hc = S.cosine_rows(h, REF_H)
    top = S.top_k(e[ND:], e[:ND], 3)
    t1, _ = S.ranking_metrics(REF_TOP, top)
    return cos.mean().item(), cos.min().item(), t1, hc.mean().item(), hc.min().item()


def rtn(W):
    return reference.dequantize(reference.quantize(W, FMT), FMT)


def searched(W, imp=None):
    return reference.dequantize(search_quantize(W, FMT, importance=imp), FMT)


# ---------------------------------------------------------------- data-free moments of each linear's input
def ln_of_input(i):
    return bert.embeddings.LayerNorm if i == 0 else layers[i - 1].output.LayerNorm


def gelu_moments(m, s, n=64):
    """E[gelu(h)], E[gelu(h)^2] for h ~ N(m, s^2), Gauss-Hermite."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(n)
    x = torch.tensor(x, dtype=torch.float64)
    w = torch.tensor(w, dtype=torch.float64) / math.sqrt(2 * math.pi)
    h = m.double()[:, None] + s.double()[:, None] * x[None]
    g = F.gelu(h)
    return (g * w).sum(-1).float(), (g.square() * w).sum(-1).float()


def data_free_moments(rho_attn=1.0):
    """name -> (mean (K,), second moment (K,)) under: LN output x_k = gamma_k n_k + beta_k, n_k ~ (0, 1)
    independent; attention output = attention-weighted average of v (variance x rho); FFN pre-activation
    Gaussian."""
    out = {}
    for i, lay in enumerate(layers):
        ln = ln_of_input(i)
        g, b = ln.weight.detach().float(), ln.bias.detach().float()
        mu, m2 = b, g.square() + b.square()
        for n in ("q", "k", "v"):
            out[f"{i}.{n}"] = (mu, m2)
        Wv, bv = ORIG[f"{i}.v"]
        vm = Wv @ b + bv
        vvar = Wv.square() @ g.square()
        out[f"{i}.o"] = (vm, vm.square() + rho_attn * vvar)
        ln2 = lay.attention.output.LayerNorm
        g2, b2 = ln2.weight.detach().float(), ln2.bias.detach().float()
        out[f"{i}.fi"] = (b2, g2.square() + b2.square())
        W1, b1 = ORIG[f"{i}.fi"]
        hm = W1 @ b2 + b1
        hs = (W1.square() @ g2.square()).sqrt()
        e1, e2 = gelu_moments(hm, hs)
        out[f"{i}.fo"] = (e1, e2)
    return out


def measured_moments(batches):
    """name -> (mean, second moment, full second-moment matrix) of each linear's input over real tokens."""
    acc = {n: [0, 0, 0, 0] for n in LIN}
    hooks = []
    mask_holder = {}

    def mk(n):
        def hook(mod, args):
            x = args[0].detach().float()
            m = mask_holder["m"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[m]
            a = acc[n]
            a[0] += x.sum(0)
            a[1] += x.square().sum(0)
            a[2] += x.T @ x
            a[3] += x.shape[0]

        return hook

    for n, m in LIN.items():
        hooks.append(m.register_forward_pre_hook(mk(n)))
    with torch.no_grad():
        for ids, am in batches:
            mask_holder["m"] = am
            bert(input_ids=ids, attention_mask=am)
    for h in hooks:
        h.remove()
    return {n: (a[0] / a[3], a[1] / a[3], a[2] / a[3]) for n, a in acc.items()}


def rel(imp):
    imp = imp / imp.mean()
    return imp.clamp(min=0.01)


def gptq(W, H, blocksize=128, damp=0.01):
    """GPTQ with group scales searched on the error-updated group (as the notes' prototype)."""
    W = W.clone()
    n, k = W.shape
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for g0 in range(0, k, 128):
        # group params from the current (updated) group, weighted by diag(H)
        grp = W[:, g0 : g0 + 128]
        qt = search_quantize(grp, FMT, importance=rel(torch.diag(H)[g0 : g0 + 128].float()))
        s, z = qt.scale, qt.zero_point  # (n, 1)
        for j in range(g0, g0 + 128):
            w = W[:, j]
            c = torch.round(w / s[:, 0] + z[:, 0]).clamp(0, 15)
            q = (c - z[:, 0]) * s[:, 0]
            Q[:, j] = q
            err = (w - q) / Hinv[j, j]
            W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
    return Q


def hqq(W, p=0.7, beta=10.0, kappa=1.01, iters=20):
    """HQQ (Badri & Shaji 2023): zero-point only, lp (p<1) loss, half-quadratic solver, RTN scale."""
    q = reference.quantize(W, FMT)
    s = q.scale.unsqueeze(-1)  # (n, G, 1)
    z = q.zero_point.unsqueeze(-1).clone()
    w = W.unflatten(-1, (-1, 128))
    best = None
    best_err = float("inf")
    for _ in range(iters):
        c = torch.round(w / s + z).clamp(0, 15)
        r = (c - z) * s
        we = w - r
        # shrink lp
        a = we.abs()
        we = torch.sign(we) * F.relu(a - (1 / beta) * a.clamp(min=1e-8).pow(p - 1))
        z = (c - (w - we) / s).mean(-1, keepdim=True)
        beta *= kappa
        c = torch.round(w / s + z).clamp(0, 15)
        err = ((c - z) * s - w).abs().mean().item()
        if err < best_err:
            best_err, best = err, ((c - z) * s).flatten(-2)
    return best


def run(label, weights, biases=None):
    r = evaluate(weights, biases)
    print(f"{label:<58} {r[0]:.5f} {r[1]:.5f} {r[2] * 8:.0f}/8  {r[3]:.5f} {r[4]:.5f}", flush=True)
    return r


def each(fn):
    """name -> fn(name, original weight) over the 36 linears."""
    return {n: fn(n, w) for n, (w, _) in ORIG.items()}


def corrected(wq, means):
    """Bias correction: b - (Wq - W) E[x], E[x] from `means` (name -> (mean, ...))."""
    return {n: b - (wq[n] - w) @ means[n][0] for n, (w, b) in ORIG.items()}


def random_token_batches(seed=0):
    """4 batches of 8 random-token sequences (24 tokens, [CLS] ... [SEP]; ids >= 1000 skip [unused])."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        ids = torch.randint(1000, bert.config.vocab_size, (8, 24), generator=g)
        ids[:, 0] = tok.cls_token_id
        ids[:, -1] = tok.sep_token_id
        batches.append((ids, torch.ones_like(ids)))
    return batches


def correlation(a, b, names):
    for n in names:
        x, y = torch.log(a[n][1].clamp(min=1e-8)), torch.log(b[n][1].clamp(min=1e-8))
        print(f"  corr(log E[x^2]) vs calibration, {n}: {torch.corrcoef(torch.stack([x, y]))[0, 1].item():.3f}")


if __name__ == "__main__":
    which = set(sys.argv[1:] or ["all"])
    every = "all" in which
    print(f"{'method':<58} mean    min     top1  held    heldmin")
    t = time.time()
    base = each(lambda n, w: searched(w))
    print(f"(search of all 36 weights: {time.time() - t:.1f} s)")
    run("RTN", each(lambda n, w: rtn(w)))
    run("search (default)", base)

    cal = measured_moments(S.calibration_batches(tok, "cpu"))
    df = data_free_moments()
    correlation(df, cal, ("0.q", "0.o", "0.fi", "0.fo", "3.q", "3.o", "3.fo", "5.q", "5.fi", "5.fo"))
    ln_fed = ("q", "k", "v", "fi")
    if every or "imp" in which:
        run("oracle: weighted search, calibration E[x^2]", each(lambda n, w: searched(w, rel(cal[n][1]))))
        run("1a weighted search, data-free E[x^2] (LN gamma/beta prop.)", each(lambda n, w: searched(w, rel(df[n][1]))))
        df03 = data_free_moments(rho_attn=0.3)
        run("1a' same, attention variance x0.3", each(lambda n, w: searched(w, rel(df03[n][1]))))
        run(
            "1b weighted only LN-fed (q,k,v,fi), rest plain",
            each(lambda n, w: searched(w, rel(df[n][1])) if n.split(".")[1] in ln_fed else base[n]),
        )
        run(
            "1c weighted, gamma^2 only (no beta)",
            each(
                lambda n, w: searched(w, rel(df[n][1] - df[n][0].square() + 1e-6))
                if n.split(".")[1] in ln_fed
                else base[n]
            ),
        )
    if every or "awq" in which:
        for alpha in (0.25, 0.5):
            scales = {n: rel(df[n][1]).pow(alpha / 2) for n in ORIG}  # (data-free RMS)^alpha
            scaled = each(lambda n, w: searched(w * scales[n]) / scales[n])
            run(f"2 DFQ/AWQ-style column scale (data-free RMS)^{alpha}", scaled)
    if every or "bias" in which:
        run("3 bias correction, data-free mean, on search", base, corrected(base, df))
        run("3' bias correction, calibration mean (oracle)", base, corrected(base, cal))
        weighted = each(lambda n, w: searched(w, rel(df[n][1])))
        run("1a + 3", weighted, corrected(weighted, df))
    if every or "hqq" in which:
        run("HQQ lp p=0.7 zero-point solve", each(lambda n, w: hqq(w)))
        run("HQQ lp p=0.5", each(lambda n, w: hqq(w, p=0.5)))
    if every or "gptq" in which:
        t = time.time()
        run(
            "4 GPTQ, data-free H = diag(var) + mu mu^T",
            each(lambda n, w: gptq(w, torch.diag(df[n][1] - df[n][0].square()) + torch.outer(df[n][0], df[n][0]))),
        )
        print(f"  ({time.time() - t:.0f} s)")
        run("oracle: GPTQ, calibration H", each(lambda n, w: gptq(w, cal[n][2])))
    if every or "synth" in which or "combo" in which:
        syn = measured_moments(random_token_batches())
        correlation(syn, cal, ("0.q", "3.o", "5.fo"))
        weighted = each(lambda n, w: searched(w, rel(syn[n][1])))
        run("5 weighted search, random-token E[x^2]", weighted)
        run("5' GPTQ, random-token H", each(lambda n, w: gptq(w, syn[n][2])))
        run("5 + bias correction random-token mean", weighted, corrected(weighted, syn))
        scales = {n: rel(syn[n][1]).sqrt().sqrt() for n in ORIG}  # (random-token RMS)^0.5
        awq = each(lambda n, w: searched(w * scales[n], rel(syn[n][1]) / scales[n].square()) / scales[n])
        run("5 + AWQ column scale (random-token RMS)^0.5", awq)
        run("5 + AWQ^0.5 + bias corr", awq, corrected(awq, syn))
    if every or "combo" in which:
        # In-sample bound: statistics of the evaluated corpus batch itself (what the backend could take
        # from the first call's inputs); held-out text shows how much of it is overfitting.
        ins = measured_moments([inputs])
        wq = each(lambda n, w: gptq(w, ins[n][2]))
        run("upper bound: GPTQ, H from the corpus itself", wq)
        run("upper bound: GPTQ + bias corr, corpus itself", wq, corrected(wq, ins))
