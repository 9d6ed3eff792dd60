/* XDP TTL rewriter: set the IPv4 TTL to NEW_TTL, fix the header checksum with bpf_csum_diff,
 * swap the Ethernet addresses and bounce the packet back out (XDP_TX). */
#include "common.h"

#define NEW_TTL 64

SEC("xdp")
int xdp_rewrite_ttl(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	unsigned char mac[ETH_ALEN];
	struct iphdr *iph;
	__u32 from = 0, to = 0;
	__s64 sum;

	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return XDP_ABORTED;

	/* The 16-bit word holding ttl and protocol, before and after. */
	__builtin_memcpy(&from, &iph->ttl, 2);
	iph->ttl = NEW_TTL;
	__builtin_memcpy(&to, &iph->ttl, 2);
	sum = bpf_csum_diff(&from, sizeof(from), &to, sizeof(to), ~((__u32)iph->check) & 0xffff);
	iph->check = csum_fold(sum);

	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
