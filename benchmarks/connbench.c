/*
 * A client and a sink for measuring what a new TCP connection costs (benchmarks/ebpf_connection_cost.py).
 *
 *   connbench sink PORT...                 accept on 127.0.0.1:PORT and close at once (RST), forever
 *   connbench connect ADDR PORT N [UID]    N connections to ADDR:PORT (as UID), closed at once (RST);
 *                                          prints the mean nanoseconds per connection of the fastest
 *                                          of 4 batches, and how many connects were reset and retried
 *
 * Both sides close with SO_LINGER 0, so no TIME_WAIT piles up and no ephemeral port runs out.
 * Python's connect loop would hide differences under ~5 us; this one does not.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 8
#define BATCHES 4

static void reset_on_close(int fd)
{
	struct linger linger = { .l_onoff = 1, .l_linger = 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, sizeof(linger));
}

static int sink(int argc, char **argv)
{
	struct pollfd fds[MAX_PORTS];
	int n = 0;

	for (int i = 0; i < argc && n < MAX_PORTS; i++) {
		struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[i])) };
		int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

		address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&address, sizeof(address)) || listen(fd, 4096)) {
			perror("sink");
			return 1;
		}
		fds[n].fd = fd;
		fds[n].events = POLLIN;
		n++;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (poll(fds, n, -1) < 0)
			continue;
		for (int i = 0; i < n; i++) {
			if (!(fds[i].revents & POLLIN))
				continue;
			int conn = accept(fds[i].fd, NULL, NULL);

			if (conn >= 0) {
				reset_on_close(conn);
				close(conn);
			}
		}
	}
}

static int client(const char *host, int port, long count, int uid)
{
	struct sockaddr_storage address = { 0 };
	socklen_t length;
	int family;
	struct timespec start, end;

	if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&address)->sin_addr) == 1) {
		family = AF_INET;
		((struct sockaddr_in *)&address)->sin_family = AF_INET;
		((struct sockaddr_in *)&address)->sin_port = htons(port);
		length = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&address)->sin6_addr) == 1) {
		family = AF_INET6;
		((struct sockaddr_in6 *)&address)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&address)->sin6_port = htons(port);
		length = sizeof(struct sockaddr_in6);
	} else {
		fprintf(stderr, "bad address %s\n", host);
		return 2;
	}
	if (uid >= 0 && (setresgid(uid, uid, uid) || setresuid(uid, uid, uid))) {
		perror("setresuid");
		return 1;
	}
	long retries = 0;
	double best = -1;

	/* The figure is the fastest of BATCHES batches: on a shared machine other work only adds time. */
	for (int batch = 0; batch < BATCHES; batch++) {
		long n = count / BATCHES;

		clock_gettime(CLOCK_MONOTONIC, &start);
		for (long i = 0; i < n; i++) {
			int fd = socket(family, SOCK_STREAM, 0);

			if (connect(fd, (struct sockaddr *)&address, length)) {
				/* A reused source port can meet conntrack's entry of an earlier connection; retry. */
				if (errno == ECONNRESET && retries < count / 10) {
					close(fd);
					retries++;
					i--;
					continue;
				}
				fprintf(stderr, "connect %s:%d: %s\n", host, port, strerror(errno));
				return 1;
			}
			reset_on_close(fd);
			close(fd);
		}
		clock_gettime(CLOCK_MONOTONIC, &end);
		double mean = ((end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec)) / n;

		if (best < 0 || mean < best)
			best = mean;
	}
	printf("%.1f %ld\n", best, retries);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && strcmp(argv[1], "sink") == 0)
		return sink(argc - 2, argv + 2);
	if (argc >= 5 && strcmp(argv[1], "connect") == 0)
		return client(argv[2], atoi(argv[3]), atol(argv[4]), argc > 5 ? atoi(argv[5]) : -1);
	fprintf(stderr, "usage: connbench sink PORT... | connbench connect ADDR PORT N [UID]\n");
	return 2;
}
