// Hybrid drafts: graft a context n-gram continuation (a chain of tokens) onto the recycling draft
// tree, so one verification forward checks both. The chain is walked from the root: while the
// current node has a child with the chain's next token it moves there (the draft already holds
// it); from the first token it lacks, the rest of the chain is appended as new nodes below.
//
// CPU only: host-side integer work on trees of tens of nodes; no CUDA version.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace token_recycling::kernels {

// tree_tokens: [batch, num_nodes] (node 0 = root); parents: [num_nodes] shared by all rows;
// chain: [batch, chain_width]; chain_len: [batch], each in [0, chain_width].
// Outputs, with M = num_nodes + chain_width nodes per row:
//   tokens [batch, M], out_parents [batch, M], depths [batch, M], mask [batch, M, M], num_out [batch].
// Row b holds the tree's nodes unchanged, then the appended chain nodes, num_out[b] in all. Nodes
// from num_out[b] on are padding: the root's token, parent 0, depth 1, mask = itself and the root.
// Forwarding one is harmless: it is a well-formed leaf (the root token drafted after the root), no
// node lies below it, and if verification accepts it the model did predict that token there.
// mask[b, i, j] is true iff j is i or an ancestor of i.
inline Status graft_chain(const int64_t* tree_tokens, const int32_t* parents, int64_t batch, int64_t num_nodes,
                          const int64_t* chain, const int64_t* chain_len, int64_t chain_width, int64_t* tokens,
                          int32_t* out_parents, int64_t* depths, bool* mask, int64_t* num_out) {
  Status s = CheckSizes({{"batch", batch}, {"num_nodes", num_nodes}, {"chain_width", chain_width}});
  if (!s.ok) return s;
  if (num_nodes > INT32_MAX - chain_width) {
    return Status::Error(std::to_string(num_nodes) + " + " + std::to_string(chain_width) +
                         " nodes do not fit int32 parents");
  }
  std::vector<int32_t> depth(num_nodes);
  s = CheckTreeParents(parents, num_nodes, depth.data(), nullptr);
  if (!s.ok) return s;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < num_nodes; ++i) {
      const int64_t t = tree_tokens[b * num_nodes + i];
      if (t < 0) {
        return Status::Error("tree_tokens[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                             std::to_string(t) + " is not a token id (negative)");
      }
    }
    const int64_t len = chain_len[b];
    if (len < 0 || len > chain_width) return OutOfRange("chain_len", b, len, 0, chain_width + 1);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t t = chain[b * chain_width + j];
      if (t < 0) {
        return Status::Error("chain[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(t) +
                             " is not a token id (negative) but lies within chain_len[" + std::to_string(b) +
                             "] = " + std::to_string(len));
      }
    }
  }

  // Children of every tree node in increasing index order (CSR), shared by all rows. Appended
  // chain nodes need no entry: once the walk appends a node it appends all later tokens, so it
  // never looks for a child of a chain node (nor can a tree node gain one before it stops merging).
  std::vector<int64_t> first_child(num_nodes + 1, 0), children(num_nodes > 0 ? num_nodes - 1 : 0);
  for (int64_t i = 1; i < num_nodes; ++i) ++first_child[parents[i] + 1];
  for (int64_t i = 0; i < num_nodes; ++i) first_child[i + 1] += first_child[i];
  {
    std::vector<int64_t> fill(first_child.begin(), first_child.end() - 1);
    for (int64_t i = 1; i < num_nodes; ++i) children[fill[parents[i]]++] = i;
  }

  const int64_t M = num_nodes + chain_width;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t* tok = tokens + b * M;
    int32_t* par = out_parents + b * M;
    int64_t* dep = depths + b * M;
    bool* msk = mask + b * M * M;
    std::copy(tree_tokens + b * num_nodes, tree_tokens + (b + 1) * num_nodes, tok);
    std::copy(parents, parents + num_nodes, par);
    std::copy(depth.begin(), depth.end(), dep);

    int64_t cur = 0, count = num_nodes;
    bool appending = false;
    for (int64_t j = 0; j < chain_len[b]; ++j) {
      const int64_t c = chain[b * chain_width + j];
      if (!appending) {
        int64_t next = -1;
        for (int64_t k = first_child[cur]; k < first_child[cur + 1]; ++k) {
          if (tok[children[k]] == c) {
            next = children[k];
            break;
          }
        }
        if (next >= 0) {
          cur = next;
          continue;
        }
        appending = true;
      }
      tok[count] = c;
      par[count] = static_cast<int32_t>(cur);
      dep[count] = dep[cur] + 1;
      cur = count++;
    }
    for (int64_t i = count; i < M; ++i) {
      tok[i] = tok[0];
      par[i] = 0;
      dep[i] = 1;
    }
    num_out[b] = count;

    // A node sees what its parent sees, and itself; parents come first, so one pass suffices.
    std::fill(msk, msk + M * M, false);
    msk[0] = true;
    for (int64_t i = 1; i < M; ++i) {
      bool* row = msk + i * M;
      const bool* parent_row = msk + par[i] * M;
      std::copy(parent_row, parent_row + par[i] + 1, row);
      row[i] = true;
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
