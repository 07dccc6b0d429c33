//! Bearer-token authentication of the API.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, ApiState};

/// Lets a request through only with a configured bearer token (or when authentication is
/// explicitly off for local development).
pub(super) async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.settings.http.insecure_no_auth {
        return Ok(next.run(request).await);
    }
    if state.tokens.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_tokens",
            "no API token is configured (http.tokens or http.token_files); \
             set http.insecure_no_auth = true only for local development",
        ));
    }
    let presented = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token)
            if state
                .tokens
                .iter()
                .any(|t| constant_time_eq(t.expose().trim().as_bytes(), token.as_bytes())) =>
        {
            Ok(next.run(request).await)
        }
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the bearer token is not valid",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_token",
            "send Authorization: Bearer <token>",
        )),
    }
}

/// Compares without returning early, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_every_byte() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
    }
}
