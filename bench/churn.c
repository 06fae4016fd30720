/* Loopback connection churn for bench_recorder.py: connect, request, response, close, as fast as it goes.
 *
 *   churn server WORKERS           WORKERS forked processes, each with a listener of its own on
 *                                  127.0.0.1 (the ports are printed after "ready"), each serving one
 *                                  connection at a time: read the request, answer, read to EOF (the
 *                                  socket is in CLOSE_WAIT), close() (-> LAST_ACK).
 *   churn client PORT SECONDS      connect, send a request, read the answer, close() first (the client
 *                                  end goes FIN_WAIT -> TIME_WAIT); repeat for SECONDS; print how many.
 *
 * Every connection makes about ten TCP state changes, two of them the CLOSE_WAIT edges the recorder
 * acts on. The client's TIME_WAIT ports are reused on loopback (net.ipv4.tcp_tw_reuse=2, the default)
 * but each only once a second, and connect() picks from half the ephemeral range: ~14,000
 * connections/s per destination. One port per worker keeps that ceiling out of the way.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(int workers) {
    int listeners[256];
    if (workers < 1 || workers > 256) return 2;
    printf("ready");
    for (int i = 0; i < workers; i++) {
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
        socklen_t len = sizeof addr;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        listeners[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (bind(listeners[i], (struct sockaddr *)&addr, sizeof addr) || listen(listeners[i], 4096) ||
            getsockname(listeners[i], (struct sockaddr *)&addr, &len)) {
            perror("listen");
            return 1;
        }
        printf(" %d", ntohs(addr.sin_port));
    }
    printf("\n");
    fflush(stdout);
    for (int i = 0; i < workers; i++) {
        if (fork() == 0) {
            char buf[256];
            for (;;) {
                int conn = accept(listeners[i], NULL, NULL);
                if (conn < 0) continue;
                if (read(conn, buf, sizeof buf) > 0) {
                    if (write(conn, "HTTP/1.0 200 OK\r\n\r\nok", 21) < 0) perror("write");
                }
                while (read(conn, buf, sizeof buf) > 0) {
                }
                close(conn);
            }
        }
    }
    while (wait(NULL) > 0) {
    }
    return 0;
}

static int client(int port, double seconds) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char buf[256];
    long done = 0, failed = 0;
    double end = now() + seconds;
    while (now() < end) {
        int sock = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(sock, (struct sockaddr *)&addr, sizeof addr) == 0 &&
            write(sock, "GET / HTTP/1.0\r\n\r\n", 18) == 18 && read(sock, buf, sizeof buf) > 0)
            done++;
        else
            failed++;
        close(sock);
    }
    printf("%ld %ld\n", done, failed);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "server") == 0) return serve(atoi(argv[2]));
    if (argc == 4 && strcmp(argv[1], "client") == 0) return client(atoi(argv[2]), atof(argv[3]));
    fprintf(stderr, "usage: churn server WORKERS | churn client PORT SECONDS\n");
    return 2;
}
