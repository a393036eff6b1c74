"""NumPy references written from each paper's equations (and torch's documented algorithm for its own
optimizers), independent of lmopt's implementation: float64, one tensor with role ``attn_q``."""

import math

import numpy as np

LR, WD, EPS = 0.01, 0.1, 1e-8


def adam_dir(m, v, t, b1, b2, eps=EPS):
    return (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def adamw(w, grads, betas=(0.9, 0.95), lr=LR, wd=WD, eps=EPS):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w * (1 - lr * wd) - lr * adam_dir(m, v, t, *betas, eps)
    return w


def asm(w, grads):
    # attention q: lr x 3.5e-4/3e-4, beta1 0.97 (base betas (0.95, 0.95)), no weight decay
    return adamw(w, grads, betas=(0.97, 0.95), lr=LR * 3.5 / 3.0, wd=0.0)


def asa(w, grads, lam=0.1, betas=(0.9, 0.95)):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        sigma = np.linalg.svd(w, compute_uv=False)[0]  # spectral norm of the parameter before the step
        w = w * (1 - LR * WD) - LR * 1.2 * (1 + lam * sigma) * adam_dir(m, v, t, *betas)
    return w


def lamb(w, grads, betas=(0.9, 0.999), eps=1e-6, wd=0.01, max_trust=10.0):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = adam_dir(m, v, t, *betas, eps) + wd * w
        trust = min(np.linalg.norm(w), max_trust) / np.linalg.norm(r)
        w = w - LR * trust * r
    return w


def stable_adamw(w, grads, betas=(0.9, 0.95)):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        v_hat = v / (1 - betas[1] ** t)
        rms = math.sqrt(np.mean(g * g / np.maximum(v_hat, EPS**2)))
        w = w * (1 - LR * WD) - LR / max(1.0, rms) * adam_dir(m, v, t, *betas)
    return w


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def adafactor(w, grads, lr=LR, wd=WD, eps1=FLOAT32_EPS, eps2=1e-3, decay=-0.8, d=1.0):
    # torch.optim.Adafactor's documented algorithm (factored second moment, relative step capped by lr)
    row, col = np.zeros((w.shape[0], 1)), np.zeros((1, w.shape[1]))
    for t, g in enumerate(grads, 1):
        one_minus_beta2 = t**decay
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, np.linalg.norm(w) / math.sqrt(w.size)) * rho
        w = w * (1 - lr * wd)
        row = row + one_minus_beta2 * ((g * g).mean(axis=1, keepdims=True) - row)
        col = col + one_minus_beta2 * ((g * g).mean(axis=0, keepdims=True) - col)
        var = row @ col / max(row.mean(), eps1)
        u = g / np.sqrt(np.maximum(var, eps1 * eps1))
        denom = max(1.0, np.linalg.norm(u) / (math.sqrt(u.size) * d))
        w = w - alpha / denom * u
    return w


def ortho_adam(w, grads, Q, betas=(0.9, 0.95)):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        gr = g @ Q
        m = betas[0] * m + (1 - betas[0]) * gr
        v = betas[1] * v + (1 - betas[1]) * gr * gr
        w = w * (1 - LR * WD) - LR * adam_dir(m, v, t, *betas) @ Q.T
    return w


def msam(w, grads, betas=(0.9, 0.95, 0.999)):
    mf, ms, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        norm = np.linalg.norm(g) * np.linalg.norm(ms)
        gamma = 0.0 if norm == 0 else min(1.0, max(0.0, float((g * ms).sum() / norm)))
        mf = betas[0] * mf + (1 - betas[0]) * g
        ms = betas[1] * ms + (1 - betas[1]) * g
        v = betas[2] * v + (1 - betas[2]) * g * g
        alpha = 0.85 + 0.1 * gamma  # attention
        m_hat = alpha * mf / (1 - betas[0] ** t) + (1 - alpha) * ms / (1 - betas[1] ** t)
        w = w * (1 - LR * WD) - LR * m_hat / (np.sqrt(v / (1 - betas[2] ** t)) + EPS)
    return w


def amcs(w, grads, total_steps=4, betas=(0.9, 0.95, 0.999)):
    mf, ms, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        mf = betas[0] * mf + (1 - betas[0]) * g
        ms = betas[1] * ms + (1 - betas[1]) * g
        v = betas[2] * v + (1 - betas[2]) * g * g
        alpha = 1 - (t - 1) / (total_steps - 1)
        m_hat = alpha * mf / (1 - betas[0] ** t) + (1 - alpha) * ms / (1 - betas[1] ** t)
        w = w * (1 - LR * WD) - LR * 1.2 * m_hat / (np.sqrt(v / (1 - betas[2] ** t)) + EPS)
    return w


def newton_schulz5(G, a=3.4445, b=-4.7750, c=2.0315, steps=5, eps=1e-7):
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / max(np.linalg.norm(X), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def muon(w, grads, mu=0.95):
    buf = np.zeros_like(w)
    for g in grads:
        buf = mu * buf + (1 - mu) * g
        update = g + mu * (buf - g)  # Nesterov, in torch's lerp form
        lr = LR * 0.2 * math.sqrt(max(w.shape))  # match_rms_adamw
        w = w * (1 - LR * WD) - lr * newton_schulz5(update)
    return w


def spectra(w, grads, mu=0.95, rank_fraction=0.015, rms_target=0.2):
    M = np.zeros_like(w)
    for g in grads:
        M = mu * M + (1 - mu) * g
        U, s, Vt = np.linalg.svd(M, full_matrices=False)
        k = math.ceil(rank_fraction * min(M.shape))
        tau = math.sqrt((s[k:] ** 2).sum() / (len(s) - k))
        shaped_s = np.concatenate([np.minimum(s[:k], tau), s[k:]])  # clip the spike to the tail's RMS
        O = (U * shaped_s) @ Vt
        O = O * rms_target / math.sqrt(np.mean(O * O))
        w = w * (1 - LR * WD) - LR * O
    return w
