//! ② Rules: conditions written in PromQL, evaluated in-process over the registry's samples and
//! history.
//!
//! So far this holds the expression evaluator (`expr`); the rule files, the pending/firing
//! state machine and hot reload build on it. Uses `sample` and `registry` (read only), never
//! collectors.

pub mod expr;
pub mod state;
