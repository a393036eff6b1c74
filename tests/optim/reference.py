"""Reference updates written from each paper's equations (and torch's documented algorithm for its own
optimizers), in NumPy float64 with plain loops and ``numpy.linalg``. Nothing here imports lmopt: the
references share no helper, constant or code path with the implementations they check.

Every reference takes the initial weights ``w`` ({name: array}), a list of gradients per step ({name: array}),
the parameters' ``roles`` ({name: role}) and the lr and weight decay given to ``lmopt.optim.build``; it returns
the weights after the last step. How a role is treated is written out here, from the papers and docs/optimizers.md:

    weight decay     on 2-D parameters of the roles attention (q, k, v, o, fused qkv), mlp and head; none on
                     embeddings, norms and "other" (lmopt.optim.roles.role_param_groups' rule)
    ASM              q and k: lr x 3.5e-4 / 3e-4, beta1 0.97, no weight decay; base betas (0.95, 0.95)
    ASA              attention matrices: lr x 1.2 and step x (1 + 0.1 sigma(W)); embeddings lr x 0.8; weight
                     decay with the role's lr (issue 20's decision)
    MSAM             mixing weight alpha: attention 0.85 + 0.1 gamma, embeddings and norms 0.05 gamma, the rest
                     (mlp, head, other) 0.6 + 0.3 gamma; gamma = max(0, cos(g, slow momentum before the step))
    AMCS             lr x 1.2 attention, x 0.8 embeddings, x 1 otherwise, weight decay with that lr (issue 20)
    Muon, Spectra    hidden matrices (attention, mlp; 2-D): their own update; everything else: AdamW (0.9, 0.95)
"""

import math

import numpy as np

ATTENTION = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"}
HIDDEN = ATTENTION | {"mlp"}
DECAYED = HIDDEN | {"head"}
ROLES = ATTENTION | {"embedding", "head", "mlp", "norm", "other"}


def decay_of(name, w, roles, wd):
    if roles[name] not in ROLES:
        raise KeyError(f"the references do not know role {roles[name]!r}: write down how each optimizer treats it")
    return wd if roles[name] in DECAYED and w.ndim >= 2 else 0.0


def adam_direction(m, v, t, beta1, beta2, eps):
    return (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)


def _adamw_tensor(w, grads, lr, wd, betas, eps):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w * (1 - lr * wd) - lr * adam_direction(m, v, t, betas[0], betas[1], eps)
    return w


def _per_tensor(update):
    """A reference that updates each tensor on its own: update(name, w, [g_1, g_2, ...], roles, lr, wd) -> w."""

    def run(w, grads, roles, lr, wd, **kw):
        return {name: update(name, w[name], [g[name] for g in grads], roles, lr, wd, **kw) for name in w}

    return run


@_per_tensor
def adamw(name, w, grads, roles, lr, wd, betas=(0.9, 0.95), eps=1e-8):
    return _adamw_tensor(w, grads, lr, decay_of(name, w, roles, wd), betas, eps)


@_per_tensor
def asm(name, w, grads, roles, lr, wd):
    if roles[name] in ("attn_q", "attn_k"):
        return _adamw_tensor(w, grads, lr * 3.5e-4 / 3e-4, 0.0, (0.97, 0.95), 1e-8)
    return _adamw_tensor(w, grads, lr, decay_of(name, w, roles, wd), (0.95, 0.95), 1e-8)


@_per_tensor
def asa(name, w, grads, roles, lr, wd, lam=0.1, betas=(0.9, 0.95), eps=1e-8):
    role = roles[name]
    spectral = role in ATTENTION and w.ndim == 2
    role_lr = lr * (1.2 if role in ATTENTION else 0.8 if role == "embedding" else 1.0)
    decay = decay_of(name, w, roles, wd)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        scale = 1 + lam * np.linalg.svd(w, compute_uv=False)[0] if spectral else 1.0  # sigma of W before the step
        w = w * (1 - role_lr * decay) - role_lr * scale * adam_direction(m, v, t, betas[0], betas[1], eps)
    return w


@_per_tensor
def lamb(name, w, grads, roles, lr, wd, betas=(0.9, 0.999), eps=1e-6, max_trust=10.0, trust_from="current"):
    # trust_from "previous": step t uses the norms of step t - 1 (its own at the first step)
    decay = decay_of(name, w, roles, wd)
    m, v = np.zeros_like(w), np.zeros_like(w)
    previous = None
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = adam_direction(m, v, t, betas[0], betas[1], eps) + decay * w
        norms = (min(np.linalg.norm(w), max_trust), np.linalg.norm(r))
        w_norm, r_norm = norms if trust_from == "current" or previous is None else previous
        trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        previous = norms
        w = w - lr * trust * r
    return w


def stable_adamw_clip(g, v, t, beta2, eps):
    """Algorithm 2 of Wortsman et al.: RMS_t = sqrt(mean(g² / max(v̂, ε²))); the lr is divided by max(1, RMS_t)."""
    v_hat = v / (1 - beta2**t)
    return max(1.0, math.sqrt(float(np.mean(g * g / np.maximum(v_hat, eps * eps)))))


@_per_tensor
def stable_adamw(name, w, grads, roles, lr, wd, betas=(0.9, 0.95), eps=1e-8):
    decay = decay_of(name, w, roles, wd)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        eta = lr / stable_adamw_clip(g, v, t, betas[1], eps)
        w = w - lr * decay * w - eta * adam_direction(m, v, t, betas[0], betas[1], eps)
    return w


def haar_orthogonal(gaussian):
    """The Q of a QR decomposition of a square Gaussian matrix, column signs fixed so R has a positive diagonal:
    a Haar-distributed orthogonal matrix (Mezzadri 2007)."""
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))


def ortho_adam(w, grads, roles, lr, wd, rotations, betas=(0.9, 0.95), eps=1e-8):
    """``rotations``: {name: Q (n x n)} acting on each tensor's last dimension (a 1-D tensor as a row)."""
    out = {}
    for name, w0 in w.items():
        Q, x, decay = rotations[name], w0, decay_of(name, w0, roles, wd)
        m, v = np.zeros_like(x), np.zeros_like(x)
        for t, g in enumerate((gs[name] for gs in grads), 1):
            gr = g @ Q
            m = betas[0] * m + (1 - betas[0]) * gr
            v = betas[1] * v + (1 - betas[1]) * gr * gr
            x = x * (1 - lr * decay) - lr * adam_direction(m, v, t, betas[0], betas[1], eps) @ Q.T
        out[name] = x
    return out


@_per_tensor
def msam(name, w, grads, roles, lr, wd, betas=(0.9, 0.95, 0.999), eps=1e-8, gamma_lag=0):
    # gamma_lag 1: step t uses the stability measured at step t - 1 (0 at the first step)
    role, decay = roles[name], decay_of(name, w, roles, wd)
    fast, slow, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    measured = []
    for t, g in enumerate(grads, 1):
        norms = np.linalg.norm(g) * np.linalg.norm(slow)
        measured.append(0.0 if norms == 0 else min(1.0, max(0.0, float(np.sum(g * slow)) / norms)))
        gamma = measured[-1 - gamma_lag] if len(measured) > gamma_lag else 0.0
        if role in ATTENTION:
            alpha = 0.85 + 0.1 * gamma
        elif role in ("embedding", "norm"):
            alpha = 0.05 * gamma
        else:
            alpha = 0.6 + 0.3 * gamma
        fast = betas[0] * fast + (1 - betas[0]) * g
        slow = betas[1] * slow + (1 - betas[1]) * g
        v = betas[2] * v + (1 - betas[2]) * g * g
        m_hat = alpha * fast / (1 - betas[0] ** t) + (1 - alpha) * slow / (1 - betas[1] ** t)
        w = w * (1 - lr * decay) - lr * m_hat / (np.sqrt(v / (1 - betas[2] ** t)) + eps)
    return w


@_per_tensor
def amcs(name, w, grads, roles, lr, wd, total_steps, betas=(0.9, 0.95, 0.999), eps=1e-8):
    role = roles[name]
    component_lr = lr * (1.2 if role in ATTENTION else 0.8 if role == "embedding" else 1.0)
    decay = decay_of(name, w, roles, wd)
    fast, slow, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        fast = betas[0] * fast + (1 - betas[0]) * g
        slow = betas[1] * slow + (1 - betas[1]) * g
        v = betas[2] * v + (1 - betas[2]) * g * g
        alpha = 1 - (t - 1) / (total_steps - 1)
        m_hat = alpha * fast / (1 - betas[0] ** t) + (1 - alpha) * slow / (1 - betas[1] ** t)
        w = w * (1 - component_lr * decay) - component_lr * m_hat / (np.sqrt(v / (1 - betas[2] ** t)) + eps)
    return w


@_per_tensor
def adafactor(name, w, grads, roles, lr, wd, eps2=1e-3, decay_rate=-0.8, d=1.0):
    """torch.optim.Adafactor's documented algorithm: relative step min(lr, 1/sqrt(t)) scaled by max(eps2, RMS(w)),
    factored second moment (row and column means of g²) for matrices, update clipped at RMS d."""
    eps1 = float(np.finfo(w.dtype).eps)
    decay = decay_of(name, w, roles, wd)
    row, col = np.zeros((w.shape[0], 1)), np.zeros((1, w.shape[-1]))
    var = np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        one_minus_beta2 = t**decay_rate
        alpha = max(eps2, np.linalg.norm(w) / math.sqrt(w.size)) * min(lr, 1 / math.sqrt(t))
        w = w * (1 - lr * decay)
        if w.ndim == 2:
            row = row + one_minus_beta2 * ((g * g).mean(axis=1, keepdims=True) - row)
            col = col + one_minus_beta2 * ((g * g).mean(axis=0, keepdims=True) - col)
            var_hat = row @ col / max(row.mean(), eps1)
        else:
            var = var + one_minus_beta2 * (g * g - var)
            var_hat = var
        u = g / np.sqrt(np.maximum(var_hat, eps1 * eps1))
        w = w - alpha / max(1.0, np.linalg.norm(u) / (math.sqrt(u.size) * d)) * u
    return w


def newton_schulz5(G, a=3.4445, b=-4.7750, c=2.0315, steps=5, eps=1e-7):
    """Keller Jordan's quintic iteration X <- aX + (bA + cA²)X, A = XXᵀ, on the wide orientation, from X/||X||_F."""
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / max(np.linalg.norm(X), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _matrix_or_adamw(matrix_update):
    """Hidden matrices get ``matrix_update``; every other parameter AdamW (0.9, 0.95), as Muon and Spectra do."""

    def run(w, grads, roles, lr, wd, **kw):
        out = {}
        for name, w0 in w.items():
            gs = [g[name] for g in grads]
            if roles[name] in HIDDEN and w0.ndim == 2:
                out[name] = matrix_update(w0, gs, lr, decay_of(name, w0, roles, wd), **kw)
            else:
                out[name] = _adamw_tensor(w0, gs, lr, decay_of(name, w0, roles, wd), (0.9, 0.95), 1e-8)
        return out

    return run


@_matrix_or_adamw
def muon(w, grads, lr, wd, mu=0.95):
    buf = np.zeros_like(w)
    for g in grads:
        buf = mu * buf + (1 - mu) * g  # torch's lerp form of the momentum
        nesterov = g + mu * (buf - g)
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * newton_schulz5(nesterov)  # match_rms_adamw
    return w


def spectra_shape(M, k):
    """Spectra's shaping of one momentum matrix from its exact SVD: the top-k singular values clipped to the
    tail's RMS singular value tau = sqrt(sum_{i>k} s_i² / (r - k)), the tail unchanged. Returns (O, tau, s, s')."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    tau = math.sqrt(float(np.sum(s[k:] ** 2)) / (len(s) - k))
    shaped = np.concatenate([np.minimum(s[:k], tau), s[k:]])
    return (U * shaped) @ Vt, tau, s, shaped


@_matrix_or_adamw
def spectra(w, grads, lr, wd, mu=0.95, rank_fraction=0.015, rms_target=0.2):
    M = np.zeros_like(w)
    k = math.ceil(rank_fraction * min(w.shape))
    for g in grads:
        M = mu * M + (1 - mu) * g
        O = spectra_shape(M, k)[0]
        w = w * (1 - lr * wd) - lr * rms_target * O / math.sqrt(float(np.mean(O * O)))
    return w
