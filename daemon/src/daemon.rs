//! Orchestration. (owner: lead)
