//! `NO_PROXY` matching, as Go's `net/http` (golang.org/x/net/http/httpproxy)
//! does it, since the Kubernetes tools beside tether-agent read the same
//! variable that way:
//!
//! - entries are separated by commas (and spaces), compared case-insensitively;
//! - `*` alone matches every host;
//! - `example.com` matches that name and its subdomains; `.example.com` and
//!   `*.example.com` match subdomains only (curl also matches the bare name:
//!   where the two differ, Go wins);
//! - `10.0.0.0/8` matches IP addresses in that network, `10.1.2.3` and `::1`
//!   that address; names are not resolved, as in Go and curl;
//! - `host:port`, `1.2.3.4:443` and `[::1]:443` match only that port;
//! - `localhost` and loopback addresses never go through a proxy.

use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    everything: bool,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Network {
        addr: IpAddr,
        prefix: u8,
    },
    Address {
        addr: IpAddr,
        port: Option<u16>,
    },
    Domain {
        name: String,
        subdomains_only: bool,
        port: Option<u16>,
    },
}

impl NoProxy {
    /// Parses a `NO_PROXY` value. Entries that cannot mean anything (an
    /// empty name, a bad port or prefix) are skipped, as Go and curl skip
    /// them; they are returned so the agent can say so.
    pub fn parse(list: &str) -> (Self, Vec<String>) {
        let mut no_proxy = Self::default();
        let mut ignored = Vec::new();
        for item in list
            .split([',', ' ', '\t'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            if item == "*" {
                no_proxy.everything = true;
                continue;
            }
            match parse_entry(&item.to_ascii_lowercase()) {
                Some(entry) => no_proxy.entries.push(entry),
                None => ignored.push(item.to_owned()),
            }
        }
        (no_proxy, ignored)
    }

    /// Whether a connection to `host` (a name or an IP literal, without
    /// brackets) on `port` bypasses the proxy.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        if host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()) || self.everything {
            return true;
        }
        let port_matches = |wanted: &Option<u16>| wanted.is_none_or(|p| p == port);
        self.entries.iter().any(|entry| match (entry, ip) {
            (Entry::Network { addr, prefix }, Some(ip)) => in_network(ip, *addr, *prefix),
            (Entry::Address { addr, port }, Some(ip)) => *addr == ip && port_matches(port),
            (
                Entry::Domain {
                    name,
                    subdomains_only,
                    port,
                },
                _,
            ) => {
                let suffix_match = host
                    .strip_suffix(name.as_str())
                    .is_some_and(|rest| rest.ends_with('.'));
                let name_match = suffix_match || (!subdomains_only && host == *name);
                name_match && port_matches(port)
            }
            _ => false,
        })
    }
}

fn parse_entry(item: &str) -> Option<Entry> {
    if let Some((addr, prefix)) = item.split_once('/') {
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        return (prefix <= bits).then_some(Entry::Network { addr, prefix });
    }
    if let Ok(addr) = item.parse::<IpAddr>() {
        return Some(Entry::Address { addr, port: None });
    }
    // `[::1]:443`, `1.2.3.4:443` or `name:443`.
    let (host, port) = match item.rsplit_once(':') {
        Some((host, port)) => (host, Some(port.parse::<u16>().ok()?)),
        None => (item, None),
    };
    let host = host.trim_matches(['[', ']']);
    if let Ok(addr) = host.parse::<IpAddr>() {
        return Some(Entry::Address { addr, port });
    }
    let (name, subdomains_only) = match host.strip_prefix("*.").or_else(|| host.strip_prefix('.')) {
        Some(name) => (name, true),
        None => (host, false),
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    valid.then(|| Entry::Domain {
        name: name.to_owned(),
        subdomains_only,
        port,
    })
}

fn in_network(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    let (ip, network, bits) = match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            (u128::from(ip.to_bits()), u128::from(net.to_bits()), 32u32)
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => (ip.to_bits(), net.to_bits(), 128),
        _ => return false,
    };
    let host_bits = bits - u32::from(prefix);
    ip.checked_shr(host_bits).unwrap_or(0) == network.checked_shr(host_bits).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bypass(list: &str, host: &str, port: u16) -> bool {
        NoProxy::parse(list).0.matches(host, port)
    }

    /// The cases golang.org/x/net/http/httpproxy's tests list, for a
    /// destination on port 443 unless the entry names another.
    #[test]
    fn go_httpproxy_cases() {
        let list = "foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, \
                    192.168.1.3:80, 10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:2]:443, \
                    [2001:db8::52:0:3]:80, 2002:db8:a::45/64, bar.com:80, foo.com";
        let cases: &[(&str, u16, bool)] = &[
            ("localhost", 443, true),
            ("127.0.0.1", 443, true),
            ("127.0.0.2", 443, true),
            ("::1", 443, true),
            ("[::1]", 443, true),
            ("192.168.1.1", 443, true),
            ("192.168.1.2", 443, false),
            ("192.168.1.2", 81, true),
            ("192.168.1.3", 80, true),
            ("192.168.1.3", 443, false),
            ("10.0.0.2", 443, true),
            ("10.0.0.4", 443, false),
            ("2001:db8::52:0:1", 443, true),
            ("2001:db8::52:0:2", 443, true),
            ("2001:db8::52:0:3", 443, false),
            ("2001:db8::52:0:3", 80, true),
            ("2002:db8:a::123", 443, true),
            ("2002:db8:b::123", 443, false),
            ("foobar.com", 443, true),
            ("www.foobar.com", 443, true),
            ("afoobar.com", 443, false),
            ("barbaz.net", 443, false),
            ("www.barbaz.net", 443, true),
            ("a.b.barbaz.net", 443, true),
            ("wildcard.io", 443, false),
            ("www.wildcard.io", 443, true),
            ("bar.com", 80, true),
            ("www.bar.com", 80, true),
            ("bar.com", 443, false),
            ("www.bar.com", 443, false),
            ("foo.com", 443, true),
            ("FOO.COM", 443, true),
            ("www.foo.com", 443, true),
            ("xfoo.com", 443, false),
            ("example.org", 443, false),
        ];
        for &(host, port, expected) in cases {
            assert_eq!(bypass(list, host, port), expected, "{host}:{port}");
        }
    }

    /// curl's documented forms: `*` alone, and space-separated entries;
    /// where curl and Go differ (`.example.com` against `example.com`),
    /// Go's answer is kept.
    #[test]
    fn curl_cases_and_where_go_differs() {
        assert!(bypass("*", "anything.example", 443));
        assert!(bypass("example.com other.org", "www.other.org", 443));
        assert!(bypass("example.com", "example.com", 8443));
        assert!(!bypass(".example.com", "example.com", 443), "Go semantics");
        assert!(bypass(".example.com", "www.example.com", 443));
        assert!(!bypass("", "example.com", 443));
        assert!(!bypass("*.", "example.com", 443));
    }

    #[test]
    fn unusable_entries_are_reported_and_ignored() {
        let (no_proxy, ignored) =
            NoProxy::parse("good.example, bad.example:http, 10.0.0.0/99, wr*ng, .");
        assert_eq!(ignored, ["bad.example:http", "10.0.0.0/99", "wr*ng", "."]);
        assert!(no_proxy.matches("good.example", 443));
        assert!(!no_proxy.matches("bad.example", 443));
    }

    #[test]
    fn networks_compare_only_the_prefix() {
        assert!(bypass("0.0.0.0/0", "203.0.113.9", 443));
        assert!(!bypass("0.0.0.0/0", "2001:db8::1", 443), "family differs");
        assert!(bypass("198.18.0.0/15", "198.19.255.255", 443));
        assert!(!bypass("198.18.0.0/15", "198.20.0.0", 443));
        assert!(bypass("203.0.113.7/32", "203.0.113.7", 443));
        assert!(!bypass("203.0.113.7/32", "203.0.113.8", 443));
        assert!(bypass("::/0", "2001:db8::1", 443));
    }
}
