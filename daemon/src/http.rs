//! HTTP. (owner: lead)
