/* TC classifier: count packets and bytes per IPv4 5-tuple in a per-CPU hash map. */
#include "common.h"
#include <linux/pkt_cls.h>

struct flow_stats {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
} flows SEC(".maps");

/* Packets seen that are not IPv4 TCP/UDP (lives in .bss). */
__u64 other_packets;

SEC("tc")
int count_flows(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct flow_key key = {};
	struct flow_stats *stats;
	struct iphdr *iph;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		goto other;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		goto other;
	key.saddr = iph->saddr;
	key.daddr = iph->daddr;
	key.proto = iph->protocol;
	if (iph->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(iph + 1);

		if ((void *)(tcp + 1) > data_end)
			goto other;
		key.sport = tcp->source;
		key.dport = tcp->dest;
	} else if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(iph + 1);

		if ((void *)(udp + 1) > data_end)
			goto other;
		key.sport = udp->source;
		key.dport = udp->dest;
	} else {
		goto other;
	}

	stats = bpf_map_lookup_elem(&flows, &key);
	if (stats) {
		stats->packets += 1;
		stats->bytes += skb->len;
	} else {
		struct flow_stats fresh = { .packets = 1, .bytes = skb->len };

		bpf_map_update_elem(&flows, &key, &fresh, BPF_NOEXIST);
	}
	return TC_ACT_OK;
other:
	__sync_fetch_and_add(&other_packets, 1);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
