//! md5 password authentication, checked against the plaintext password.

use super::constant_time_eq;

/// Check an md5 password response against a plaintext password.
pub fn verify_md5(user: &str, password: &str, salt: [u8; 4], response: &str) -> bool {
    let expected =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
    constant_time_eq(expected.as_bytes(), response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_check() {
        let response = postgres_protocol::authentication::md5_hash(b"app", b"pw", [1, 2, 3, 4]);
        assert!(verify_md5("app", "pw", [1, 2, 3, 4], &response));
        assert!(!verify_md5("app", "other", [1, 2, 3, 4], &response));
        assert!(!verify_md5("app", "pw", [1, 2, 3, 5], &response));
    }
}
