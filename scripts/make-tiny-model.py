#!/usr/bin/env python3
"""Writes a tiny deterministic llama GGUF model for the end-to-end tests and the demo.

Run it with the project's venv (it needs the `gguf` package from
tests/python/requirements.txt):

    .venv/bin/python scripts/make-tiny-model.py      # prints the model's path

It uses the tokenizer-only vocab that scripts/build-llama-server.sh keeps in its
cache (llama.cpp's models/ggml-vocab-llama-spm.gguf, 32000 tokens), adds ChatML's
<|im_start|>/<|im_end|> as control tokens and a ChatML chat template, and writes
a 2-layer llama (n_embd 64, 4 heads) of about 9 MB next to the llama-server binary:

- attention and FFN weights are zero, so the residual stream is the token embedding;
- every token of SENTENCE has its own one-hot embedding, every other token shares
  one "start" direction;
- output.weight maps each sentence token to its successor with a large logit, the
  last one to <|im_end|> (EOS; and, with half that logit, back to the first token
  so `ignore_eos` repeats the sentence), and the "start" direction to the first token.

So whatever the prompt, every reply is exactly SENTENCE, at any temperature. The
sentence and its token count are stored in the metadata (llm_edge.reply,
llm_edge.reply_tokens). The file name carries a hash of this script, so editing
it makes a new model; an existing one is reused at once.
"""

import argparse
import hashlib
import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter

SENTENCE = "The quick brown fox jumps over the lazy dog."
N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX_TRAIN = 65536  # room for long ignore_eos generations (llama-server caps slots at this)
# RMSNorm turns a one-hot embedding of any size into 8 (= sqrt(64)) on its axis;
# 12.5 * 8 = a logit of 100, far above the others (0) even at temperature 2.
LOGIT_WEIGHT = 12.5

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKEN_TYPE_CONTROL = 3


def default_cache():
    base = os.environ.get("LLM_EDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-edge")
    return os.path.join(base, "llama.cpp-b11434")


def field(reader, key):
    return reader.fields[key].contents()


def sentence_tokens(sentence, token_to_id):
    """Splits the sentence into vocab pieces (SentencePiece style, spaces as U+2581),
    greedily longest first; the result detokenizes to exactly the sentence."""
    text = sentence.replace(" ", "\u2581")
    ids, i = [], 0
    while i < len(text):
        for j in range(len(text), i, -1):
            if text[i:j] in token_to_id:
                ids.append(token_to_id[text[i:j]])
                i = j
                break
        else:
            sys.exit(f"make-tiny-model: no vocab piece for {text[i:]!r}")
    return ids


def build(vocab_path, out_path, sentence):
    reader = GGUFReader(vocab_path)
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    scores = list(field(reader, "tokenizer.ggml.scores"))
    types = list(field(reader, "tokenizer.ggml.token_type"))
    im_start, im_end = len(tokens), len(tokens) + 1
    tokens += ["<|im_start|>", "<|im_end|>"]
    scores += [0.0, 0.0]
    types += [TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    n_vocab = len(tokens)
    token_to_id = {t: i for i, t in enumerate(tokens) if types[i] in (1, 6)}  # normal, byte

    seq = sentence_tokens(sentence, token_to_id)
    if len(set(seq)) != len(seq):
        sys.exit(f"make-tiny-model: the sentence's tokens must be unique: {[tokens[t] for t in seq]}")
    if len(seq) + 1 > N_EMBD:
        sys.exit("make-tiny-model: sentence too long for n_embd")

    start_dim = len(seq)
    embd = np.zeros((n_vocab, N_EMBD), dtype=np.float16)
    embd[:, start_dim] = 1.0
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float16)
    for dim, tok in enumerate(seq):
        embd[tok, :] = 0.0
        embd[tok, dim] = 1.0
        if dim + 1 < len(seq):
            output[seq[dim + 1], dim] = LOGIT_WEIGHT
        else:
            output[im_end, dim] = LOGIT_WEIGHT
            output[seq[0], dim] = LOGIT_WEIGHT / 2
    output[seq[0], start_dim] = LOGIT_WEIGHT

    tmp = out_path + f".tmp{os.getpid()}"
    w = GGUFWriter(tmp, "llama")
    w.add_name("llm-edge tiny deterministic")
    w.add_block_count(N_LAYER)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(int(field(reader, "tokenizer.ggml.bos_token_id")))
    w.add_eos_token_id(im_end)
    w.add_unk_token_id(int(field(reader, "tokenizer.ggml.unknown_token_id")))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHATML)
    w.add_string("llm_edge.reply", sentence)
    w.add_uint32("llm_edge.reply_tokens", len(seq))

    ones = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.zeros((N_EMBD, N_EMBD), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", np.zeros((N_FF, N_EMBD), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((N_FF, N_EMBD), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((N_EMBD, N_FF), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=default_cache(), help="directory of the llama-server build (default: %(default)s)")
    ap.add_argument("--vocab", help="vocab GGUF (default: CACHE/ggml-vocab-llama-spm.gguf)")
    ap.add_argument("--out", help="output file (default: CACHE/tiny-chatml-<hash>.gguf)")
    args = ap.parse_args()

    vocab = args.vocab or os.path.join(args.cache, "ggml-vocab-llama-spm.gguf")
    if not os.path.isfile(vocab):
        sys.exit(f"make-tiny-model: {vocab} is missing: run scripts/build-llama-server.sh first")
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = args.out or os.path.join(args.cache, f"tiny-chatml-{digest}.gguf")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        build(vocab, out, SENTENCE)
    print(out)


if __name__ == "__main__":
    main()
